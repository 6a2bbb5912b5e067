"""Splitting a CPU host into XLA devices (vard_jax/parallel/host.py): the automatic count, never
over a count the user chose, and that a fresh process gets those devices while the environment
its subprocesses inherit stays as it was."""

import os
import subprocess
import sys

from configs import shapes
from vard_jax.parallel import host


def test_automatic_count_divides_every_sharded_batch():
    config = shapes.get_config()  # batches 16 (sample), 32 (eval), 64 (value)
    assert host.auto_devices(config, cores=1) == 1
    assert host.auto_devices(config, cores=2) == 2
    assert host.auto_devices(config, cores=3) == 2  # 3 divides none of them
    assert host.auto_devices(config, cores=6) == 4
    assert host.auto_devices(config, cores=64) == 16  # the sample batch limits it
    config.value.batch_size = 24
    assert host.auto_devices(config, cores=64) == 8  # gcd(16, 32, 24)
    config.mesh.fsdp = 2  # an explicit mesh keeps XLA's single device unless asked
    assert host.auto_devices(config, cores=64) == 1
    config.mesh.cpu_devices = 4
    assert host.device_count(config, cores=64) == 4


def test_the_plan_never_overrides_the_users_count():
    config = shapes.get_config()
    assert host.planned_count(config, {"XLA_FLAGS": "--xla_cpu_enable_fast_math=false"},
                              cores=2) == 2
    users = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    assert host.planned_count(config, users, cores=8) is None
    assert host.planned_count(config, {"JAX_NUM_CPU_DEVICES": "1"}, cores=8) is None
    assert host.planned_count(config, {}, cores=1) is None  # 1 = XLA's default
    config.mesh.cpu_devices = 3
    assert host.planned_count(config, {}, cores=1) == 3


def _fresh_process(code: str, **environ) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    env.update(JAX_PLATFORMS="cpu", **environ)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, timeout=120, cwd=os.path.dirname(os.path.dirname(
                                os.path.abspath(__file__))))
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_a_fresh_process_starts_with_the_configured_devices():
    """configure() before the first device call decides the process's device count; the
    environment (what subprocesses inherit) is unchanged; a count the user set wins."""
    code = ("import os; from configs import shapes; from vard_jax.parallel import host; "
            "c = shapes.get_config(); c.mesh.cpu_devices = 3; print(host.configure(c)); "
            "import jax; print(jax.default_backend(), jax.device_count(), "
            "os.environ.get('XLA_FLAGS', '-'), os.environ.get('JAX_NUM_CPU_DEVICES', '-'))")
    assert _fresh_process(code) == ["3", "cpu", "3", "-", "-"]
    assert _fresh_process(code, JAX_NUM_CPU_DEVICES="2") == ["None", "cpu", "2", "-", "2"]
