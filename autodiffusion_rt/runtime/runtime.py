"""The runtime: walk a plan's schedule, one engine per step.

``Runtime.load(DIR)`` reads an engine dir written by ``autodiffusion-rt build``
(only its ``manifest.json`` and engine files: the core never imports the
exporter); ``Runtime.from_plan(plan)`` runs a plan on the PyTorch model, the
reference every backend is compared with. Both sample exactly like
:func:`autodiffusion_rt.sample`: x_T, labels and every step's noise come from
each sample's own generator (:class:`~autodiffusion_rt.diffusion.SampleNoise`,
through :func:`~autodiffusion_rt.sampling.initial_state`), drawn as each chunk
runs, so the same plan and seed give the same images on every backend, within
float tolerance, whatever the chunk size or the requests batched together.

Engines are loaded once. Sampling runs through per-batch-size ping-pong
buffers kept between calls, so switching engines along the schedule allocates
nothing in the steady state (beyond the seeded draws themselves).

The engine dir's ``manifest.json`` is read and checked by :class:`~.manifest.Manifest`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Sequence

import numpy as np
import torch

from ..diffusion import SampleNoise, SamplerCoefficients
from ..diffusion.step_io import NOISE, X_PREV, X, Y, step_tensors
from ..errors import EngineError
from ..models.loading import load_model_for_plan
from ..plan import Plan
from ..sampling import check_finite, check_labels, check_n, initial_state, sample_rows
from .backends.base import Engine
from .backends.torch_backend import TorchStepEngine
from .device import DeviceResidentWalk, plan_step_buffers, slot_spec
from .manifest import Manifest

__all__ = ["BACKENDS", "ModelInfo", "Runtime", "sample_from_engines"]

BACKENDS = ("torch", "onnxruntime", "openvino", "tensorrt")


class BoundStep(NamedTuple):
    """Step ``index`` bound to a workspace's buffers: ``run()`` reads its inputs there, writes ``output`` (x_prev)."""

    run: Callable[[], Any]
    stochastic: bool  # reads the noise buffer, refilled before each call
    output: np.ndarray
    index: int
    name: str


@dataclass(frozen=True)
class ModelInfo:
    """What sampling needs to know about the model when only engines are loaded."""

    name: str
    image_shape: tuple[int, int, int]
    num_classes: Optional[int]


# ------------------------------------------------------------------ runtime
class Runtime:
    """A plan's steps as engines, walked in order; ``sample(n, seed, labels)`` gives images in [-1, 1]."""

    def __init__(
        self,
        engines: Sequence[Engine],
        plan: Plan,
        coeffs: SamplerCoefficients,
        info: ModelInfo,
        backend: str,
        max_batch: Optional[int] = None,
        *,
        backend_name: Optional[str] = None,
        engine_dir: Optional[Path] = None,
        manifest: Optional[Manifest] = None,
        resources: Sequence = (),
    ):
        if len(engines) != len(coeffs):
            raise EngineError(f"{len(engines)} engines for {len(coeffs)} steps")
        self.engines = list(engines)
        self.plan = plan
        self.coeffs = coeffs
        self.info = info
        self.backend = backend
        self.backend_name = backend_name or backend
        self.max_batch = max_batch
        self.engine_dir = engine_dir
        self.manifest = manifest
        self._resources = list(resources)  # callables run when the runtime closes (scratch memory, stream)
        self._workspaces: "OrderedDict[int, dict]" = OrderedDict()
        self._lock = threading.Lock()  # one sampling call at a time: the workspaces are shared
        self._device_walk: Optional[DeviceResidentWalk] = None  # set by load() for GPU backends

    # ------------------------------------------------------------ creation
    @classmethod
    def from_plan(
        cls, plan: Plan, backend: str = "torch", *, model=None, batch_size: int = 256, device=None
    ) -> "Runtime":
        """Run ``plan`` on the PyTorch model (the reference); the model is loaded from the plan when not given.

        ``device``: where the model runs (default cpu); a model loaded here is
        moved there, a given one must already be there. Images come back on
        the host, equal to the CPU's up to float rounding.
        """
        if backend != "torch":
            raise EngineError(
                f"Runtime.from_plan runs a plan on PyTorch (backend='torch'), got backend={backend!r}: for onnxruntime "
                "or tensorrt build an engine dir first ('autodiffusion-rt build PLAN --backend "
                f"{backend} --out DIR') and use Runtime.load(DIR)"
            )
        plan = Plan.load(plan)  # a Plan or a path
        loaded = model is None
        model = load_model_for_plan(plan, model)
        if loaded and device is not None:
            from ..sampling import check_device

            model.unet.to(check_device(None, device))  # a bad or absent device is a SamplingError, not torch's
        coeffs = plan.coefficients(model.schedule)
        keeps = plan.keep_sets(model)
        conditional = model.num_classes is not None
        engines = []
        for i, t in enumerate(plan.timesteps):
            ins, outs = step_tensors(coeffs, i, model.image_shape, conditional)
            engines.append(
                TorchStepEngine(
                    model,
                    coeffs.row(i),
                    t,
                    keeps[i],
                    ins,
                    outs,
                    name=f"step {i} (t={t}, torch)",
                    batch_size=batch_size,
                    device=device,
                )
            )
        info = ModelInfo(model.name, tuple(model.image_shape), model.num_classes)
        dev = engines[0].device if engines else None
        return cls(
            engines,
            plan,
            coeffs,
            info,
            "torch",
            None,
            backend_name="torch" if dev is None or dev.type == "cpu" else f"torch/{dev}",
        )

    @classmethod
    def load(
        cls,
        engine_dir,
        backend: str = "auto",
        *,
        plan: Optional[Plan] = None,
        model=None,
        providers: Optional[Sequence[str]] = None,
        threads: Optional[int] = None,
        check_versions: bool = True,
        cuda_graph: "bool | str" = False,
        share_weights: bool = True,
        spinning: bool = True,
        device_resident: Optional[bool] = None,
    ) -> "Runtime":
        """Load an engine dir built by ``autodiffusion-rt build``.

        ``backend``: ``auto`` (what the dir was built for), the same backend
        named explicitly (``onnxruntime``, ``openvino``, ``tensorrt``; a
        tensorrt dir also runs on ``onnxruntime``'s GPU providers), or
        ``torch`` (the dir's plan on the PyTorch model; needs the model's
        weights). ``threads``: onnxruntime's or OpenVINO's threads per step.
        ``plan``: refuse the dir unless it was built from this plan.
        ``providers``: onnxruntime execution providers (cpu, cuda,
        tensorrt), best first; default: the best installed. Every engine file
        is checked against its recorded sha256 and, unless
        ``check_versions=False``, the libraries against the recorded versions.
        ``share_weights``: the onnxruntime step sessions read one copy of the
        tensors their files have in common. ``spinning=False``: onnxruntime's
        workers sleep instead of spinning while they wait for work.
        ``cuda_graph`` (TensorRT): ``True`` or ``"step"`` replays each step as
        its own CUDA graph; ``"schedule"`` replays the whole schedule as one
        graph per batch size (needs the device-resident walk).
        ``device_resident``: keep each request's state on the device from x_T
        to the result (one copy in, one out; for TensorRT one synchronize per
        request) instead of copying to and from the host at every step.
        Default: on for TensorRT and onnxruntime's CUDA/TensorRT providers;
        ``True`` on onnxruntime's CPU provider runs the same walk on CPU OrtValues.
        """
        engine_dir = Path(engine_dir)
        plan = None if plan is None else Plan.load(plan)  # a Plan or a path
        m = Manifest.read(engine_dir)
        the_plan, coeffs = m.check_plan(plan)
        chosen = _chosen_backend(m, backend, cuda_graph, device_resident)
        if chosen == "torch":
            rt = cls.from_plan(the_plan, "torch", model=model)
            rt.engine_dir, rt.manifest = engine_dir, m
            return rt
        loaded = _backend_module(chosen).load_engines(
            m,
            the_plan,
            coeffs,
            providers=providers,
            threads=threads,
            check_versions=check_versions,
            cuda_graph=cuda_graph,
            share_weights=share_weights,
            spinning=spinning,
            device_resident=device_resident,
        )
        rt = cls(
            loaded.engines,
            the_plan,
            coeffs,
            _model_info(m, the_plan),
            chosen,
            int(m["batch"]["max"]),
            backend_name=loaded.backend_name,
            engine_dir=engine_dir,
            manifest=m,
            resources=loaded.resources,
        )
        rt._device_walk = loaded.device_walk
        return rt

    # ------------------------------------------------------------ sampling
    @property
    def num_steps(self) -> int:
        return len(self.coeffs)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.info.image_shape

    @property
    def num_classes(self) -> Optional[int]:
        return self.info.num_classes

    def sample(
        self,
        n: int,
        seed: int = 0,
        labels=None,
        *,
        return_labels: bool = False,
        progress: bool = False,
        clip: bool = True,
        first: int = 0,
    ):
        """``n`` images in [-1, 1] (NCHW float32), equal to :func:`autodiffusion_rt.sample`'s for the same seed.

        Runs in chunks of at most the engines' maximum batch; every sample's
        draws come from its own generator, so chunking does not change the images.
        ``clip=False`` returns the final step's output before the clamp to [-1, 1].
        ``first``: samples ``first .. first + n - 1`` of ``seed`` (a chunk of a larger request).
        """
        n = check_n(n)
        out, y = self._sample_rows(sample_rows(seed, n, first), check_labels(self.info, labels, n), progress)
        if clip:
            out.clamp_(-1, 1)
        return (out, y) if return_labels else out

    def sample_requests(
        self, requests: Sequence[tuple[int, int, Any]]
    ) -> list[tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """Several requests ``(n, seed, labels)`` run as one batch; per request ``(images, labels)``.

        Each request's images equal ``sample(n, seed, labels)`` called alone:
        what a dynamic batcher needs to merge concurrent requests.
        """
        ns = [check_n(n) for n, _, _ in requests]
        noise = SampleNoise.for_requests([(seed, n) for n, (_, seed, _) in zip(ns, requests)])
        given = [check_labels(self.info, labels, n) for n, (_, _, labels) in zip(ns, requests)]
        labels = None
        if self.info.num_classes is not None:
            # Rows with no label given draw theirs (marked -1 here) from their own generators.
            labels = torch.cat([torch.full((n,), -1, dtype=torch.long) if g is None else g for n, g in zip(ns, given)])
        out, y = self._sample_rows(noise, labels, False)
        out.clamp_(-1, 1)
        results, s = [], 0
        for n in ns:
            results.append((out[s : s + n], None if y is None else y[s : s + n]))
            s += n
        return results

    def _sample_rows(self, noise: SampleNoise, labels, progress: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        n = len(noise)
        chunk = self.max_batch or n
        out = torch.empty((n, *self.info.image_shape))
        ys = []
        with self._lock:
            if not self.engines:
                raise EngineError("this Runtime is closed")
            for s in range(0, n, chunk):
                e = min(n, s + chunk)
                rows = noise[s:e]
                x, y = self._initial_rows(rows, None if labels is None else labels[s:e])
                out[s:e] = self._run_chunk(x, y, rows, progress)
                ys.append(y)
        y = None if self.info.num_classes is None else torch.cat(ys)
        return out, y

    def _initial_rows(
        self, rows: SampleNoise, labels: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """x_T and labels for these rows, in the draw order; a label of -1 is drawn (after x_T)."""
        if labels is None or bool((labels >= 0).all()):
            x, y, _ = initial_state(self.info, len(rows), 0, labels, noise=rows)
            return x, y
        x = rows.randn(self.info.image_shape)
        y = labels.clone()
        drawn = y < 0
        y[drawn] = rows.randint(self.info.num_classes, where=drawn)
        return x, y

    def _workspace(self, batch: int) -> dict:
        """Per-batch-size buffers and every step bound to them (validated here, once).

        Which buffer a step reads and writes depends only on its index
        (:func:`~autodiffusion_rt.runtime.device.plan_step_buffers`: x
        ping-pongs, the x0 and eps histories rotate through rings), so step ``i``
        is bound once to fixed arrays (an onnxruntime IO binding by address)
        and a request only refills x_T, the labels and each step's noise in place.
        """
        ws = self._workspaces.get(batch)
        if ws is not None:
            self._workspaces.move_to_end(batch)
            return ws
        layout, result, slots = plan_step_buffers([(e.input_names, e.output_names) for e in self.engines])
        bufs = {slot: np.empty(*slot_spec(slot, batch, self.info.image_shape)) for slot in slots}
        ws = {
            X: [bufs[(X, 0)], bufs[(X, 1)]],
            Y: bufs.get((Y, 0)),
            NOISE: bufs.get((NOISE, 0)),
        }
        steps = []
        for i, (eng, sb) in enumerate(zip(self.engines, layout)):
            feeds = {name: bufs[slot] for name, slot in sb.inputs.items()}
            out = {name: bufs[slot] for name, slot in sb.outputs.items()}
            steps.append(BoundStep(eng.bind(feeds, out), sb.stochastic, out[X_PREV], i, eng.name))
        ws["steps"], ws["result"] = steps, bufs[result]
        self._workspaces[batch] = ws
        while len(self._workspaces) > 4:  # keep a few batch sizes, not every one ever seen
            self._workspaces.popitem(last=False)
        return ws

    def _run_chunk(
        self, x: torch.Tensor, y: Optional[torch.Tensor], rows: SampleNoise, progress: bool = False
    ) -> torch.Tensor:
        if self._device_walk is not None:
            return self._run_chunk_on_device(x, y, rows, progress)
        ws = self._workspace(x.shape[0])
        np.copyto(ws[X][0], x.numpy())
        if y is not None:
            np.copyto(ws[Y], y.numpy())
        noise = None if ws[NOISE] is None else torch.from_numpy(ws[NOISE])
        steps = ws["steps"]
        if progress:
            from tqdm import tqdm

            steps = tqdm(steps, desc=f"sample ({self.backend_name})")
        for step in steps:
            if step.stochastic:
                # Drawn per step, per sample, straight into the workspace: O(chunk) memory.
                rows.randn(self.info.image_shape, out=noise)
            step.run()
            check_finite(step.output, step.index, int(self.coeffs.timesteps[step.index]), step.name)
        return torch.from_numpy(ws["result"].copy())

    # ------------------------------------------------- device-resident walk
    def _run_chunk_on_device(
        self, x: torch.Tensor, y: Optional[torch.Tensor], rows: SampleNoise, progress: bool
    ) -> torch.Tensor:
        """One chunk kept on the device from x_T to x_0 (:class:`~autodiffusion_rt.runtime.device.DeviceResidentWalk`).

        Nothing comes back between steps, so only the result is checked for
        NaN/inf (a NaN carries through the remaining steps).
        """
        bar = None
        if progress:
            from tqdm import tqdm

            bar = lambda runners: tqdm(runners, desc=f"sample ({self.backend_name}, on device)")  # noqa: E731
        out = self._device_walk.run(x.numpy(), None if y is None else y.numpy(), rows, bar)
        last = len(self.engines) - 1
        check_finite(
            out,
            last,
            int(self.coeffs.timesteps[last]),
            f"{self.backend_name} (device-resident: checked after the last step)",
        )
        return torch.from_numpy(out)

    # ------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Release the engines and their memory; the runtime cannot sample afterwards."""
        with self._lock:
            if self._device_walk is not None:
                self._device_walk.close()  # its buffers first: the stream and engines they use go next
                self._device_walk = None
            for e in self.engines:
                e.close()
            for release in reversed(self._resources):
                release()
            self.engines = []
            self._resources = []
            self._workspaces.clear()

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Runtime({self.backend_name}, {self.num_steps} steps, "
            f"timesteps={list(self.plan.timesteps)}, max_batch={self.max_batch})"
        )


def _chosen_backend(m: Manifest, backend: str, cuda_graph, device_resident: Optional[bool]) -> str:
    """The backend ``backend`` names for this engine dir (``auto``: the dir's own), after refusing options and
    backends that cannot run it."""
    if backend not in ("auto", *BACKENDS):
        raise EngineError(f"unknown backend {backend!r}: choose auto, {', '.join(BACKENDS)}")
    chosen = m["backend"] if backend == "auto" else backend
    if cuda_graph not in (False, True, "step", "schedule"):
        raise EngineError(
            f"cuda_graph={cuda_graph!r}: pass False, True (or 'step': a graph per step) "
            "or 'schedule' (one per batch size)"
        )
    if cuda_graph == "schedule" and device_resident is False:
        raise EngineError(
            "cuda_graph='schedule' replays a whole request on the device: "
            "drop device_resident=False, or use cuda_graph='step'"
        )
    # torch runs any dir's plan. A tensorrt dir's portable ONNX exports also run on onnxruntime's GPU providers;
    # nothing else crosses over.
    if chosen not in ("torch", m["backend"]) and not (chosen == "onnxruntime" and m["backend"] == "tensorrt"):
        raise EngineError(
            f"{m.engine_dir} holds {m['backend']} engines, not {chosen} ones: load it with backend='auto' (or "
            f"'{m['backend']}'), or rebuild it with 'autodiffusion-rt build PLAN --backend {chosen} --out DIR'"
        )
    return chosen


def _model_info(m: Manifest, plan: Plan) -> ModelInfo:
    """What sampling needs to know about the model, from the manifest alone."""
    info = m["model"]
    return ModelInfo(
        str(info.get("name", plan.model_name)),
        tuple(int(s) for s in info["image_shape"]),
        None if info.get("num_classes") is None else int(info["num_classes"]),
    )


def _backend_module(name: str):
    """The backend's module; each builds its own engines from a manifest (``load_engines``)."""
    import importlib

    module = {"onnxruntime": "ort_backend", "openvino": "ov_backend", "tensorrt": "trt_backend"}[name]
    return importlib.import_module(f"{__package__}.backends.{module}")


def sample_from_engines(engine_dir, n: int, seed: int = 0, labels=None, backend: str = "auto"):
    """``(images, labels)`` from an engine dir: what ``autodiffusion-rt sample --engines DIR`` runs."""
    with Runtime.load(engine_dir, backend=backend) as rt:
        return rt.sample(n, seed=seed, labels=labels, return_labels=True)
