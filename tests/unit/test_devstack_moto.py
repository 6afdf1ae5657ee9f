"""The moto server the harness starts: moto itself, with Nagle's algorithm off on its connections."""

import socketserver

from moto.moto_server.werkzeug_app import MotoRequestHandler


def test_the_launcher_turns_nagle_off_for_motos_request_handler():
    import sdagent.devstack.moto_server  # noqa: F401  (the import is what sets the switch)

    # socketserver.StreamRequestHandler.setup sets TCP_NODELAY on each connection when this is true.
    assert issubclass(MotoRequestHandler, socketserver.StreamRequestHandler)
    assert MotoRequestHandler.disable_nagle_algorithm is True

