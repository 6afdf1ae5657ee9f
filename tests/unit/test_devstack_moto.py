"""The moto server the harness starts: moto itself, with Nagle's algorithm off on its connections."""

import socketserver
from pathlib import Path

from moto.moto_server.werkzeug_app import MotoRequestHandler


def test_the_launcher_turns_nagle_off_for_motos_request_handler():
    import sdagent.devstack.moto_server  # noqa: F401  (the import is what sets the switch)

    # socketserver.StreamRequestHandler.setup sets TCP_NODELAY on each connection when this is true.
    assert issubclass(MotoRequestHandler, socketserver.StreamRequestHandler)
    assert MotoRequestHandler.disable_nagle_algorithm is True


def test_the_launcher_lists_motos_services_once_with_the_same_answer():
    import moto.backends

    import sdagent.devstack.moto_server as launcher

    package = Path(moto.__file__).parent
    listed = sorted(p.name for p in package.iterdir() if p.is_dir() and not p.name.startswith("__"))
    assert list(moto.backends.list_of_moto_modules()) == listed  # what moto's own listing gives
    assert moto.backends.list_of_moto_modules() is launcher.MOTO_MODULES  # made once
    assert {"s3", "cloudwatch", "autoscaling", "ec2"} <= set(listed)
