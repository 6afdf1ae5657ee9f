"""``python -m sdagent.devstack.moto_server``: moto's server, minus two costs real S3 does not have.

1. Nagle's algorithm, turned off.

moto serves through werkzeug's development server, built on :mod:`http.server`, which writes a
response's headers and its body in two ``send`` calls without ``TCP_NODELAY``: the body then waits
for the client's delayed ACK of the headers (CPython issue #108736). Measured here on a kept-alive
connection, about one small PutObject in five took 10 ms more than the rest (p50 3.8, p90 14 ms;
with the flag, p90 5 ms). Real S3 has no such stall, and every benchmark and test that uploads would
otherwise be measuring it. ``disable_nagle_algorithm`` is the stdlib's own switch for this
(:class:`socketserver.StreamRequestHandler` sets ``TCP_NODELAY`` in ``setup`` when it is true).

2. A directory listing per request, done once. To route a request, moto's dispatcher asks whether
the Host header names one of its services by listing its own package directory (``listdir`` and an
``isdir`` per entry), twice a request: profiled with py-spy under bench/pipeline.py, 29 % of moto's
CPU. The package cannot change while the server runs, so the list is made once.
"""

from __future__ import annotations

import moto.backends
import werkzeug.serving
from moto.server import main

werkzeug.serving.WSGIRequestHandler.disable_nagle_algorithm = True
# The dispatcher looks it up as moto.backends.list_of_moto_modules at each call.
MOTO_MODULES = tuple(moto.backends.list_of_moto_modules())
moto.backends.list_of_moto_modules = lambda: MOTO_MODULES

if __name__ == "__main__":
    main()
