"""Benchmarks of the real chain on loopback (``python -m bench``).

Reference task server in this process, ``dsagent run`` (objecthost, CTA,
ctdataloader, workers) as real processes, real TCP, HTTP and SQLite. Nothing
here asserts a timing: it measures and prints a Markdown table (also written
to ``bench/results.md``).

Modules:

- ``report``: machine facts, percentiles, the table;
- ``chain``:  tickle -> handler latency, bulk throughput, idle memory and CPU;
- ``micro``:  floors for context (loopback TCP, HTTP keep-alive, fsync'd
  SQLite commit, task XML parse, sh spawn).
"""
