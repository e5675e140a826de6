"""``clp serve``: a local web page and a JSON endpoint that steer a trained policy (see :mod:`.app`)."""

from clp_lightning.serve.app import Limits, ServeApp, main, make_server
from clp_lightning.serve.backends import Backend, ModuleBackend, PolicyBackend

__all__ = ["Backend", "Limits", "ModuleBackend", "PolicyBackend", "ServeApp", "main", "make_server"]
