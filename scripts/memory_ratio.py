r"""Resident memory of a loaded NFE-k runtime against a one-step runtime (the 1.5x target of the runtime issues).

    python scripts/memory_ratio.py --nfe 10 --batch-sizes 1,64
    python scripts/memory_ratio.py --model diffusers:work/cifar/model --backend openvino --precision bf16 \
        --batch-sizes 1
    python scripts/memory_ratio.py --model diffusers:work/cifar/model --backend openvino \
        --plan work/cifar/plan-3skips.json
    python scripts/memory_ratio.py --random-adm \
        image_size=32,num_channels=128,num_res_blocks=2,channel_mult=1,2,2,2,attention_resolutions=16,8

Builds uniform DDIM plans of ``--nfe`` steps (or takes ``--plan``) and of one
step (t = 999) for the model, compiles both to engine dirs of ``--backend``
(onnxruntime fp32 by default; openvino shares one compiled subnetwork between
the steps that skip the same layers), and measures each loaded runtime's
resident memory after sampling a batch, every configuration in a fresh process
(``benchmark.resident_mb``); onnxruntime also with its steps' weights unshared.
``--random-adm FLAGS`` uses an ADM UNet of those guided-diffusion
flags with random weights instead (memory does not depend on the weights'
values): how the ratio behaves once the weights outweigh onnxruntime's
per-session graph state.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import autodiffusion_rt as ad  # noqa: E402
from autodiffusion_rt.diffusion import uniform_timesteps  # noqa: E402
from autodiffusion_rt.models import ADMUNet  # noqa: E402
from autodiffusion_rt.models.loading import adm_config  # noqa: E402
from autodiffusion_rt.plan import Plan  # noqa: E402
from benchmark import resident_mb  # noqa: E402  (the benchmark's one memory probe)
from export.build import build_engines  # noqa: E402


def parse_flags(text: str) -> dict:
    """'a=1,b=2,3' -> {'a': '1', 'b': '2,3'} (a value may hold commas: channel_mult=1,2,2)."""
    flags, key = {}, None
    for part in text.split(","):
        if "=" in part:
            key, value = part.split("=", 1)
            flags[key] = value
        elif key is None:
            raise SystemExit(f"--random-adm {text!r}: expected KEY=VALUE pairs, e.g. image_size=32,num_channels=128")
        else:
            flags[key] += "," + part
    return flags


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded:mnist")
    p.add_argument(
        "--random-adm", default=None, metavar="FLAGS", help="guided-diffusion flags of a random-weight ADM UNet"
    )
    p.add_argument("--nfe", type=int, default=10)
    p.add_argument("--batch-sizes", default="1,64")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "openvino"))
    p.add_argument(
        "--precision", default="fp32", choices=("fp32", "bf16"), help="openvino: fp32 or bf16 (default fp32)"
    )
    p.add_argument(
        "--plan", default=None, help="measure this plan instead of a uniform NFE-k one (e.g. several skip sets)"
    )
    p.add_argument("--work", default=None, help="keep the plans and engine dirs here (default: a temp dir)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    batches = [int(b) for b in args.batch_sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.random_adm:
            flags = parse_flags(args.random_adm)
            unet_kwargs, _ = adm_config(**flags)
            torch.manual_seed(0)
            torch.save(ADMUNet(**unet_kwargs).state_dict(), work / "random_adm.pt")
            spec, model = f"adm:{work / 'random_adm.pt'}", ad.load_model(f"adm:{work / 'random_adm.pt'}", **flags)
        else:
            spec, model = args.model, ad.load_model(args.model)
        params = sum(t.numel() for t in model.unet.parameters())
        dirs = {}
        given = Plan.load(args.plan) if args.plan else None
        nfe = given.nfe if given else args.nfe
        for k, ts in ((nfe, uniform_timesteps(model.num_timesteps, nfe)), (1, [model.num_timesteps - 1])):
            plan = given if given and k == nfe else Plan.for_model(model, ts, "ddim", spec=spec)
            dirs[k] = work / f"engines-nfe{k}"
            build_engines(
                plan,
                dirs[k],
                model=model,
                max_batch=max(batches),
                progress=False,
                backend=args.backend,
                precision=args.precision,
                int8_fid_samples=200,
            )
        rows = []
        shares = ((nfe, True), (nfe, False)) if args.backend == "onnxruntime" else ((nfe, True),)
        for b in batches:
            one = resident_mb(dirs[1], args.threads, b)
            for k, share in shares:
                mb = resident_mb(dirs[k], args.threads, b, share_weights=share)
                rows.append(
                    {
                        "model": spec,
                        "params": params,
                        "batch": b,
                        "nfe": k,
                        "share_weights": share,
                        "one_step_mb": one,
                        "resident_mb": mb,
                        "ratio": round(mb / one, 2),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    print(f"\nweights: {params / 1e6:.1f} M parameters ({params * 4 / 2**20:.1f} MiB fp32)")
    print(f"{args.backend} {args.precision}, {args.threads} thread(s)")
    print("| batch | NFE | weights shared | one step MB | NFE-k MB | ratio |\n|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['batch']} | {r['nfe']} | {r['share_weights']} | {r['one_step_mb']} "
            f"| {r['resident_mb']} | {r['ratio']}x |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
