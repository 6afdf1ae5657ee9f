"""``python -m sdagent.devstack.moto_server``: moto's server with Nagle's algorithm off.

moto serves through werkzeug's development server, built on :mod:`http.server`, which writes a
response's headers and its body in two ``send`` calls without ``TCP_NODELAY``: the body then waits
for the client's delayed ACK of the headers (CPython issue #108736). Measured here on a kept-alive
connection, about one small PutObject in five took 10 ms more than the rest (p50 3.8, p90 14 ms;
with the flag, p90 5 ms). Real S3 has no such stall, and every benchmark and test that uploads would
otherwise be measuring it. ``disable_nagle_algorithm`` is the stdlib's own switch for this
(:class:`socketserver.StreamRequestHandler` sets ``TCP_NODELAY`` in ``setup`` when it is true).
"""

from __future__ import annotations

import werkzeug.serving
from moto.server import main

werkzeug.serving.WSGIRequestHandler.disable_nagle_algorithm = True

if __name__ == "__main__":
    main()
