from agent.cta.service import main

raise SystemExit(main())
