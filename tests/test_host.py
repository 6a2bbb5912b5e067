"""Splitting a CPU host into XLA devices (vard_jax/parallel/host.py): the automatic count, the
XLA_FLAGS it writes (never over the user's), and that a fresh process gets those devices."""

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


def test_configure_writes_the_flag_once_and_never_over_the_users():
    config = shapes.get_config()
    environ = {"XLA_FLAGS": "--xla_cpu_enable_fast_math=false"}
    assert host.configure(config, environ, cores=2) == 2
    assert environ["XLA_FLAGS"] == ("--xla_cpu_enable_fast_math=false "
                                    "--xla_force_host_platform_device_count=2")
    assert host.configure(config, environ, cores=2) is None  # already there: unchanged
    assert environ["XLA_FLAGS"].count(host.FLAG) == 1
    users = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    assert host.configure(config, users, cores=8) is None
    assert users == {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    empty: dict = {}
    assert host.configure(config, empty, cores=1) is None and empty == {}  # 1 = XLA's default
    config.mesh.cpu_devices = 3
    assert host.configure(config, empty, cores=1) == 3
    assert empty == {"XLA_FLAGS": "--xla_force_host_platform_device_count=3"}


def test_a_fresh_process_starts_with_the_configured_devices():
    """configure() before the first device call decides the process's device count."""
    code = ("from configs import shapes; from vard_jax.parallel import host; "
            "c = shapes.get_config(); c.mesh.cpu_devices = 3; host.configure(c); "
            "import jax; print(jax.default_backend(), jax.device_count())")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, timeout=120, cwd=os.path.dirname(os.path.dirname(
                                os.path.abspath(__file__))))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["cpu", "3"], result.stdout
