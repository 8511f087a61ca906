"""Loads the real KV-event publisher classes of SGLang and vLLM straight from their PyPI wheels.

Neither engine is installed: the wheel is downloaded once (`pip download --no-deps`), and only
the publisher's own source files are read out of the zip and executed as modules. The heavy
imports those files make (torch, the engine's runtime) are replaced by the small stand-ins
below, which provide exactly the names the publisher files use. No engine code is kept in this
repository. Needs: msgspec, pyzmq, pydantic and psutil (SGLang's network helpers import it).

ENGINES.md §9 describes the approach; the stubs were checked against SGLang 0.5.23 and
vLLM 0.34.0.
"""

import dataclasses
import glob
import logging
import os
import subprocess
import sys
import types
import zipfile

SGLANG_VERSION = "0.5.23"
VLLM_VERSION = "0.34.0"
# The tags of the one wheel each release ships, so the download does not depend on the local
# interpreter (only pure-Python files are read out of it).
WHEEL_TAGS = {
    "sglang": ["--platform", "manylinux_2_34_x86_64", "--python-version", "311", "--implementation", "cp",
               "--abi", "cp311"],
    "vllm": ["--platform", "manylinux_2_28_x86_64", "--python-version", "311", "--implementation", "cp",
             "--abi", "abi3"],
}


def ensure_wheel(name: str, version: str, wheel_dir: str) -> str:
    """Path of `name==version`'s wheel in `wheel_dir`, downloading it (no deps) if missing."""
    os.makedirs(wheel_dir, exist_ok=True)
    pattern = os.path.join(wheel_dir, f"{name}-{version}-*.whl")
    found = sorted(glob.glob(pattern))
    if not found:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
             *WHEEL_TAGS[name], f"{name}=={version}", "-d", wheel_dir],
            check=True,
        )
        found = sorted(glob.glob(pattern))
    if not found:
        raise RuntimeError(f"pip download gave no wheel matching {pattern}")
    return found[-1]


def _package(name: str) -> types.ModuleType:
    """An empty package module (the real `__init__` would import the whole engine)."""
    mod = sys.modules.get(name)
    if mod is None:
        mod = types.ModuleType(name)
        mod.__path__ = []
        sys.modules[name] = mod
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(_package(parent), child, mod)
    return mod


def _stub(name: str, **attrs) -> types.ModuleType:
    parent, _, child = name.rpartition(".")
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    sys.modules[name] = mod
    if parent:
        setattr(_package(parent), child, mod)
    return mod


def _from_wheel(whl: zipfile.ZipFile, wheel_path: str, name: str, path: str) -> types.ModuleType:
    """Executes one source file of the wheel as module `name`."""
    source = whl.read(path).decode("utf-8")
    parent, _, child = name.rpartition(".")
    mod = types.ModuleType(name)
    mod.__file__ = f"{wheel_path}/{path}"
    sys.modules[name] = mod
    if parent:
        setattr(_package(parent), child, mod)
    exec(compile(source, mod.__file__, "exec"), mod.__dict__)
    return mod


def load_sglang(wheel_dir: str) -> types.ModuleType:
    """`sglang.srt.disaggregation.kv_events` of SGLang 0.5.23, from its wheel."""
    wheel = ensure_wheel("sglang", SGLANG_VERSION, wheel_dir)

    @dataclasses.dataclass
    class _Parallel:  # only is_kv_publisher_rank() reads it; the publisher does not
        pp_rank: int = 0
        attn_tp_rank: int = 0
        attn_cp_rank: int = 0

    _stub("sglang.srt.runtime_context", get_parallel=lambda: _Parallel())
    _package("sglang.srt.utils")
    with zipfile.ZipFile(wheel) as whl:
        _from_wheel(whl, wheel, "sglang.srt.utils.network", "sglang/srt/utils/network.py")
        return _from_wheel(whl, wheel, "sglang.srt.disaggregation.kv_events",
                           "sglang/srt/disaggregation/kv_events.py")


def load_vllm(wheel_dir: str) -> types.ModuleType:
    """`vllm.distributed.kv_events` of vLLM 0.34.0, from its wheel."""
    wheel = ensure_wheel("vllm", VLLM_VERSION, wheel_dir)

    def split_zmq_path(path: str):
        scheme, _, rest = path.partition("://")
        host, _, port = rest.rpartition(":")
        return scheme, host, port

    # vllm.config.utils.config is a pydantic dataclass decorator; a plain dataclass keeps the
    # same fields and __post_init__.
    _stub("vllm.config.utils", config=dataclasses.dataclass)
    _stub("vllm.logger", init_logger=logging.getLogger)
    _stub("vllm.utils.network_utils",
          get_ip=lambda: "127.0.0.1",
          get_tcp_uri=lambda ip, port: f"tcp://{ip}:{port}",
          is_valid_ipv6_address=lambda ip: False,
          split_zmq_path=split_zmq_path)
    _stub("vllm.v1.core.kv_cache_utils", ExternalBlockHash=bytes | int)
    with zipfile.ZipFile(wheel) as whl:
        _from_wheel(whl, wheel, "vllm.config.kv_events", "vllm/config/kv_events.py")
        return _from_wheel(whl, wheel, "vllm.distributed.kv_events", "vllm/distributed/kv_events.py")
