"""The Jupyter kernels this package starts (the course runner's and the grader's): this Python, over IPC.

Three choices, each against a problem a learner met:
- Every kernel name resolves to an ipykernel in the interpreter running this code, so a `python3` kernelspec
  installed for another Python (user-level, conda base) cannot shadow the course's environment.
- Kernels listen on Unix sockets (IPC) rather than TCP: nothing else on the machine can connect, and ipykernel
  has no reason to warn at every start that it "is running over TCP without encryption".
- A kernel is shut down without the interrupt jupyter_client sends first (see `_async_interrupt_kernel`).

The kernel's environment also carries `kernel_env()`: text progress bars (nobody watches a widget in a
kernel the runner drives, and text is what the runner streams and the saved notebook shows) and, on a machine
without CUDA, a quiet profiler.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import ipykernel.kernelspec
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from jupyter_core.paths import jupyter_runtime_dir
from traitlets import default

from mvae_course.progress import TEXT_PROGRESS

# torch.profiler's Kineto logs profiler_start/stop and, with no CUDA driver, "gpuGetDeviceCount failed with
# code 35" when a profile ends; 6 is above its highest level (Kineto reads it when the first profile starts).
KINETO_QUIET = {"KINETO_LOG_LEVEL": "6"}


def kernel_env() -> dict[str, str]:
    """Environment variables for the kernels the course starts: text progress bars; Kineto quiet without CUDA."""
    import torch

    return {TEXT_PROGRESS: "1", **({} if torch.cuda.is_available() else KINETO_QUIET)}


class _ThisPythonSpecs(KernelSpecManager):
    """Every kernel name resolves to an ipykernel in the interpreter running this code."""

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        spec = ipykernel.kernelspec.get_kernel_dict()  # argv starts with sys.executable
        return self.kernel_spec_class(resource_dir=ipykernel.kernelspec.RESOURCES, env=kernel_env(), **spec)


class CourseKernelManager(AsyncKernelManager):
    """A kernel manager for this Python's ipykernel over IPC, whatever kernelspecs are installed."""

    @default("kernel_spec_manager")
    def _kernel_spec_manager_default(self) -> KernelSpecManager:
        return _ThisPythonSpecs(data_dir=self.data_dir)

    @default("transport")
    def _transport_default(self) -> str:
        return "ipc"

    async def _async_interrupt_kernel(self) -> None:
        # jupyter_client interrupts every kernel it shuts down; the runner and the grader shut a kernel down
        # once its notebook is done, and a SIGINT arriving then only makes ipykernel log "KeyboardInterrupt
        # caught in kernel" on the terminal. A timed-out cell is still interrupted (not shutting down then).
        if not self.shutting_down:
            await super()._async_interrupt_kernel()

    @default("ip")
    def _ip_default(self) -> str:
        # The socket files' prefix. jupyter_client's default, "kernel-ipc", is relative, so the kernel (started in
        # the notebook's folder) and this client (in ours) would look in different places.
        runtime = Path(jupyter_runtime_dir())
        runtime.mkdir(mode=0o700, parents=True, exist_ok=True)
        return str(runtime / f"mvae-kernel-{uuid.uuid4().hex[:12]}")
