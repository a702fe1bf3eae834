"""The private part of Horovod that tfrun uses: its rendezvous server on a chosen address.

Horovod 0.28's ``RendezvousServer.start()`` binds ``('', port)``, every interface of the
node, and takes no address. The server is an unauthenticated key-value store through
which Gloo's ranks swap their addresses, so anyone who reaches the node could read or
change it. :func:`start_rendezvous` does what ``start()`` does but binds the address it is
given (and lets the kernel pick the free port); the server stays Horovod's own (handler,
store, ``init()``, ``stop()``).
``init()`` and ``stop()`` use two private attributes, ``_httpd`` and ``_listen_thread``,
which this module sets; tests/test_compat.py checks them against the installed Horovod.

Horovod is imported inside the function: importing a backend module loads no Horovod.
"""

from __future__ import annotations

from typing import Any


def start_rendezvous(host: str, verbose: int = 0) -> tuple[Any, int]:
    """(server, port): Horovod's ``RendezvousServer``, started and listening on ``host`` only,
    on a port the kernel picks free, its listen loop in a daemon thread as ``start()`` has it.

    Raises OSError when ``host`` is not an address of this node.
    """
    from horovod.runner.http.http_server import (
        RendezvousHandler,
        RendezvousHTTPServer,
        RendezvousServer,
    )
    from horovod.runner.util.threads import in_thread

    server = RendezvousServer(verbose=verbose)
    # Port 0 rather than Horovod's find_port: that one binds '' and, trying random ports,
    # swallows every error, so an address that cannot be bound would end as "Unable to find
    # a port to bind to." after 64511 tries instead of the reason.
    server._httpd = RendezvousHTTPServer((host, 0), RendezvousHandler, verbose)
    # Named as tfrun's: its polling is no activity of the script (tfrun.task.activity).
    server._listen_thread = in_thread(target=server._httpd.serve_forever, name="tfrun-horovod-rendezvous")
    return server, int(server._httpd.server_address[1])
