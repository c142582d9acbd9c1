import sys

from ctdataloader.uploader import main

sys.exit(main())
