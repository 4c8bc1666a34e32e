"""Data parallelism: `jit` with NamedSharding over a Mesh (the main path, optional FSDP) or `pmap`.

Both wrap the same pure steps. Under jit a step sees the global batch; under pmap it sees one device's
rows. Steps are written once, for the global batch, and reduce across devices only through
`global_sum` and `global_mean` below: identities under jit, `psum` over the axis "data" while
`Parallel` traces a step for pmap. Nothing else in the package names the axis.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxopt_llm.config import ParallelConfig
from jaxopt_llm.errors import UserError

AXIS = "data"
_compiles = [0]
_pmap_axis: contextvars.ContextVar[str | None] = contextvars.ContextVar("jaxopt_llm_pmap_axis", default=None)


def global_sum(tree):
    """Sum over all devices of a pytree computed from this device's rows: `psum` while tracing under
    `Parallel`'s pmap, identity under jit (where arrays already span all devices)."""
    axis = _pmap_axis.get()
    return tree if axis is None else jax.lax.psum(tree, axis)


def global_mean(total, count):
    """This device's share of a mean over the global batch: total / (count summed over devices).

    `total` and `count` are this device's sums (e.g. of per-token losses and of valid tokens). Under jit
    it is total / count. Under pmap each device returns its share; the shares, and their gradients,
    summed over devices give the global mean and its gradient whatever the devices' counts are. A count
    of zero everywhere gives 0, not NaN.
    """
    return total / jax.numpy.maximum(global_sum(count), 1.0)


@contextlib.contextmanager
def _tracing_under(axis: str):
    token = _pmap_axis.set(axis)
    try:
        yield
    finally:
        _pmap_axis.reset(token)


def _with_axis(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with _tracing_under(AXIS):
            return fn(*args, **kwargs)

    return wrapped


def _count_compile(event: str, *_args, **_kwargs) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        _compiles[0] += 1


jax.monitoring.register_event_duration_secs_listener(_count_compile)


def compile_count() -> int:
    """XLA compilations in this process so far, a program loaded from the persistent cache included (JAX
    records the same event for both): a test asserts a step compiles once."""
    return _compiles[0]


def initialize_distributed() -> None:
    """`jax.distributed.initialize` when launched on several processes.

    TPU pods are detected by JAX itself (set JAXOPT_DISTRIBUTED=1); elsewhere set JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES and JAX_PROCESS_ID.
    """
    if jax.distributed.is_initialized():  # a pipeline initialises once, then trains stage after stage
        return
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        # CPU collectives across processes need gloo; the setting does not touch GPU / TPU backends
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                                   num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                                   process_id=int(os.environ["JAX_PROCESS_ID"]))
    elif os.environ.get("JAXOPT_DISTRIBUTED") == "1":
        jax.distributed.initialize()


_barriers = [0]
BARRIER_TIMEOUT_S = int(os.environ.get("JAXOPT_BARRIER_TIMEOUT_S", 4 * 3600))


def on_main(name: str, fn: Callable[[], Any]) -> Any:
    """`fn()` on process 0 only, every process waiting for it; an error there is raised on every process.

    The processes must call on_main in the same order (each call is one barrier of the coordination
    service). Returns fn's result on process 0, None elsewhere. One process: just `fn()`.
    """
    if jax.process_count() == 1:
        return fn()
    from jax._src import distributed  # the coordination client: the barrier jax's own serialization uses

    client = distributed.global_state.client
    _barriers[0] += 1
    tag = f"jaxopt_llm/{_barriers[0]}/{name}"
    result, error = None, None
    if jax.process_index() == 0:
        try:
            result = fn()
        except BaseException as err:  # the others must not wait out the timeout for a failure here
            error = err
        client.key_value_set(f"{tag}/error", "" if error is None else f"{type(error).__name__}: {error}")
    client.wait_at_barrier(tag, BARRIER_TIMEOUT_S * 1000)
    if error is not None:
        raise error
    message = client.blocking_key_value_get(f"{tag}/error", 60_000)
    if message:
        raise RuntimeError(f"{name} failed on process 0: {message}")
    return result


def _chosen_devices(count: int | None) -> list:
    devices = jax.devices()
    if count is None:
        return devices
    if jax.process_count() > 1:
        raise UserError(f"parallel.devices={count} picks devices of one process; with {jax.process_count()} "
                         "processes every device takes part: leave parallel.devices unset.")
    if not 1 <= count <= len(devices):
        raise UserError(f"parallel.devices={count}: this machine has {len(devices)} devices; use 1 to "
                         f"{len(devices)}, or leave it unset for all.")
    return devices[:count]


class Parallel:
    """Placement of states and batches, and compilation of steps, for one backend."""

    def __init__(self, cfg: ParallelConfig, devices: list | None = None, members: int | None = None):
        self.cfg = cfg
        self.devices = list(devices) if devices is not None else _chosen_devices(cfg.devices)
        self.mesh = Mesh(np.asarray(self.devices), (AXIS,))
        self.local_count = len([d for d in self.devices if d.process_index == jax.process_index()])
        self.pmap = cfg.backend == "pmap"
        # an ensemble's members: states and batches carry a leading member axis of this size
        self.members = members
        if members and self.pmap:
            raise UserError("an ensemble (a leading member axis) runs under parallel.backend=jit, not pmap.")

    @property
    def _pmap_devices(self) -> list | None:
        """pmap's own default is every device; a subset must be named."""
        return None if len(self.devices) == jax.device_count() else self.devices

    def for_members(self, members: int | None) -> Parallel:
        """The same placement for states and batches with a leading member axis of `members`."""
        return self if members == self.members else Parallel(self.cfg, self.devices, members)

    @property
    def member_sharded(self) -> bool:
        """Members spread over the devices (each device trains whole members) when they divide evenly on one
        process; otherwise members are replicated and each member's batch is split over the devices."""
        return bool(self.members) and self.members % len(self.devices) == 0 and jax.process_count() == 1

    def check_batch_size(self, batch_size: int, name: str = "train.batch_size") -> None:
        n = len(self.devices)
        if batch_size % n:
            raise UserError(f"{name}={batch_size} is not divisible by the {n} devices: use a multiple of {n}.")

    # ---- placement -----------------------------------------------------------------------------
    def _leaf_sharding(self, x) -> NamedSharding:
        if self.member_sharded and getattr(x, "ndim", 0) and x.shape[0] == self.members:
            return NamedSharding(self.mesh, PartitionSpec(AXIS))
        if not self.cfg.fsdp or not getattr(x, "ndim", 0):
            return NamedSharding(self.mesh, PartitionSpec())
        n = len(self.devices)
        axes = [a for a in np.argsort(x.shape)[::-1] if x.shape[a] % n == 0 and x.shape[a] >= n]
        if not axes:
            return NamedSharding(self.mesh, PartitionSpec())
        spec = [None] * x.ndim
        spec[axes[0]] = AXIS
        return NamedSharding(self.mesh, PartitionSpec(*spec))

    def state_shardings(self, state) -> Any:
        return jax.tree.map(self._leaf_sharding, state)

    def put_state(self, state):
        """Host or device state -> replicated (or FSDP-sharded) state on the devices."""
        if self.pmap:  # stacked copies, laid out as the pmapped step returns them (so it compiles once)
            n = self.local_count
            local = Mesh(np.asarray([d for d in self.devices if d.process_index == jax.process_index()]), (AXIS,))
            sharding = NamedSharding(local, PartitionSpec(AXIS))
            return jax.tree.map(lambda x: jax.device_put(np.broadcast_to(np.asarray(x), (n, *np.shape(x))), sharding),
                                jax.device_get(state))
        return jax.device_put(state, self.state_shardings(state))

    def host_state(self, state):
        """One copy of the state, as checkpoints and exports want it."""
        return jax.tree.map(lambda x: x[0], state) if self.pmap else state

    def put_batch(self, batch: dict[str, np.ndarray], stacked: bool = False) -> dict:
        """This process's rows of a global batch -> device arrays (global arrays under jit). `stacked`: the
        arrays are (members, rows, ...), each member's own batch."""
        if self.pmap:
            n = self.local_count
            return {k: v.reshape(n, v.shape[0] // n, *v.shape[1:]) for k, v in batch.items()}
        spec = PartitionSpec(AXIS)  # examples over devices
        if stacked:  # (members, examples, ...): whole members per device, or each member's examples
            spec = PartitionSpec(AXIS) if self.member_sharded else PartitionSpec(None, AXIS)
        sharding = NamedSharding(self.mesh, spec)
        return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}

    def put_key(self, key_data):
        if self.pmap:
            return np.broadcast_to(np.asarray(key_data), (self.local_count, *np.shape(key_data)))
        return jax.device_put(key_data, NamedSharding(self.mesh, PartitionSpec()))

    # ---- compilation ---------------------------------------------------------------------------
    def compile_train(self, train_step: Callable, state, aux=None) -> Callable:
        """`step(state, batch, key_data, aux) -> (state, metrics)`; the state argument is donated.
        `aux` (e.g. teachers' params; placed with `put_state`) is never donated."""
        if self.pmap:
            return jax.pmap(_with_axis(train_step), axis_name=AXIS, donate_argnums=0, devices=self._pmap_devices)
        shardings = self.state_shardings(state)
        return jax.jit(train_step, in_shardings=(shardings, None, None, self.state_shardings(aux)),
                       out_shardings=(shardings, None), donate_argnums=0)

    def compile_eval(self, eval_step: Callable) -> Callable:
        """`eval(params, batch, aux) -> metrics`."""
        if self.pmap:
            return jax.pmap(_with_axis(eval_step), axis_name=AXIS, devices=self._pmap_devices)
        return jax.jit(eval_step)
