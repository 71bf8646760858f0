"""The Ray connection behind every scale-out (`eval run --ray`, `serve --ray`): one rule for both.

    with ray_connection("local", cpus=4) as ray:
        ray.remote(...)

"local" starts a private cluster on this machine, with no dashboard, shut down when the block
ends. Its GCS, raylet, agents and workers listen on 127.0.0.1 only: left to itself Ray binds them
to every interface and registers the node under the machine's reachable address, so a "local"
cluster would take connections from the network (Ray Serve's replicas still open one port of their
own on every interface; see docs/serve.md). "auto", "host:port" or "ray://host:port" joins an
existing cluster and disconnects at the end (the cluster keeps running). When Ray is already
initialised in this process (a library caller), that connection is used and kept. Ray is an
optional dependency: `pip install 'streamtc[ray]'`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

from .errors import StreamTCError

LOCAL = "local"
# Ray resolves 127.0.0.1 to the machine's reachable address (so other nodes could join) unless its
# single-machine mode is on; this switch (named after the platforms where that mode is the
# default) is the one that keeps every Ray process listening on the loopback interface only.
_LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


class RayUnavailableError(StreamTCError, ImportError):
    """Ray is not installed."""


def import_ray() -> Any:
    """The `ray` module, or RayUnavailableError saying how to install it."""
    try:
        import ray
    except ImportError as error:
        raise RayUnavailableError("--ray needs Ray: pip install 'streamtc[ray]' (ray>=2.9)") from error
    return ray


@contextmanager
def _loopback_only() -> Iterator[None]:
    """Ray's single-machine mode while the block runs: every process it starts listens on 127.0.0.1."""
    from ray._private import ray_constants

    saved, cluster_mode = os.environ.get(_LOOPBACK_SWITCH), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_LOOPBACK_SWITCH] = "0"  # read by the processes Ray starts
    ray_constants.ENABLE_RAY_CLUSTER = False  # read at call time by this process's address lookup
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = cluster_mode
        if saved is None:
            os.environ.pop(_LOOPBACK_SWITCH, None)
        else:
            os.environ[_LOOPBACK_SWITCH] = saved


@contextmanager
def ray_connection(address: str = LOCAL, cpus: int | None = None) -> Iterator[Any]:
    """Ray connected to `address` (see the module docstring); disconnects what it connected.
    cpus: the CPUs a local cluster offers (default: Ray's count of this machine's)."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    local = address == LOCAL
    with _loopback_only() if local else nullcontext():
        if local:
            ray.init(num_cpus=cpus, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
                     configure_logging=False)
        else:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        try:
            yield ray
        finally:
            ray.shutdown()


__all__ = ["LOCAL", "RayUnavailableError", "import_ray", "ray_connection"]
