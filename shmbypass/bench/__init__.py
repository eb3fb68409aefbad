"""`shmbypass bench`: loopback TCP against the bypass (bench/README.md).

measure.py   what is measured and how: transports, placements, tests, the
             measuring programs' command lines, statistics, the noise rule
             (also what the pytest-benchmark suites in bench/ use, with runner.py)
runner.py    one run's machinery: child processes, progress, its bypass instance
micro.py     the matrix: transport x placement x test with sbp-pingpong / sbp-ringbench
apps.py      real applications (--apps): redis, nginx + wrk, iperf3
sidecar.py   client -> haproxy -> server, on loopback and across network namespaces
targets.py   the issues' targets and how a report meets them
report.py    the report dict, the text table, bench.md, bench.png, RESULTS.md
cli.py       `shmbypass bench` itself
"""
