"""The registry of user-typed names: equal to what the code implements; the command lines read it before torch."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import numpy as np
import pytest

from autodiffusion_rt import registry


def test_sampler_names_are_the_samplers():
    from autodiffusion_rt.diffusion import samplers

    assert registry.SAMPLERS == samplers.SAMPLERS


def test_backend_and_extractor_names_are_the_implemented_ones():
    from autodiffusion_rt.metrics import EXTRACTOR_NAMES
    from autodiffusion_rt.runtime import BACKENDS

    assert registry.RUNTIME_BACKENDS == BACKENDS
    assert registry.EXTRACTORS == EXTRACTOR_NAMES
    build = pytest.importorskip("export.build")
    assert registry.BUILD_BACKENDS == build.BUILD_BACKENDS


def test_every_spacing_gives_a_schedule():
    from autodiffusion_rt.diffusion import NoiseSchedule, schedules, uniform_timesteps

    assert schedules.SPACINGS is registry.SPACINGS
    schedule = NoiseSchedule.from_betas("linear", np.linspace(1e-4, 0.02, 1000))
    for spacing in registry.SPACINGS:
        ts = uniform_timesteps(1000, 6, spacing, alphas_cumprod=schedule)
        assert ts[0] == 999 and all(a > b for a, b in zip(ts, ts[1:])) and len(ts) == 6


@pytest.mark.parametrize("kind", list(registry.MODEL_SPECS))
def test_every_model_spec_kind_is_dispatched(kind):
    """load_model knows each kind: a spec without its argument fails on that, not as an unknown kind."""
    from autodiffusion_rt import load_model
    from autodiffusion_rt.errors import ModelSpecError

    with pytest.raises(ModelSpecError) as e:
        load_model(f"{kind}:")
    assert "is not one of" not in str(e.value)
    with pytest.raises(ModelSpecError, match="is not one of 'embedded', 'adm', 'ckpt', 'diffusers'"):
        load_model("zip:x")


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, tuple[str, argparse.ArgumentParser]]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help for a in action._choices_actions}
    return {name: (helps.get(name), p) for name, p in action.choices.items()}


def test_every_command_and_option_says_what_it_is():
    """Help from the one table: each command's help line is the registry's; each has a description and each
    option a help line."""
    from autodiffusion_rt.cli import build_parser

    commands = _subcommands(build_parser())
    assert set(commands) == set(registry.COMMANDS)
    for name, (help_line, p) in commands.items():
        assert help_line == registry.COMMANDS[name][1], name
        assert p.description, f"{name} has no description"
        silent = [a.option_strings or a.dest for a in p._actions if not a.help]
        assert not silent, f"{name}: options without help: {silent}"


def test_search_and_benchmark_options_all_have_help():
    from search.run import build_parser

    p = build_parser()
    assert not [a.option_strings for a in p._actions if not a.help]


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys\nprint(' '.join(sorted(sys.modules)))"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


@pytest.mark.parametrize("code", [
    "from autodiffusion_rt.cli import build_parser, chosen_command\n"
    "build_parser(chosen_command(['sample'])).parse_args(['sample', '--steps', '4', '--spacing', 'logsnr'])",
    "from search.run import build_parser\nbuild_parser().parse_args(['--nfe', '6', '--sampler', 'ipndm'])",
    "import benchmark\n"
    "try:\n    benchmark.main(['--plan', 'p.json', '--repeats', 'x'])\nexcept SystemExit as e:\n    assert e.code == 2",
])
def test_arguments_are_parsed_before_torch_is_imported(code):
    loaded = _modules_after(code)
    assert "autodiffusion_rt.registry" in loaded or "search.run" in loaded or "benchmark" in loaded
    assert not {"torch", "numpy", "onnx"} & loaded, sorted({"torch", "numpy", "onnx"} & loaded)


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "autodiffusion_rt.cli", *args], capture_output=True, text=True,
                          timeout=600, env=None if env is None else {**os.environ, **env})


@pytest.mark.parametrize("command", list(registry.COMMANDS))
def test_every_commands_help_is_built_before_torch_is_imported(command):
    """``autodiffusion-rt COMMAND --help`` answers in well under a second: its parser imports no torch or onnx."""
    loaded = _modules_after(
        "from autodiffusion_rt.cli import build_parser, chosen_command\n"
        f"build_parser(chosen_command([{command!r}])).format_help()"
    )
    assert registry.COMMANDS[command][0] in loaded
    assert not {"torch", "onnx", "onnxruntime", "openvino"} & loaded, command


def test_version_and_a_bad_choice():
    from autodiffusion_rt import __version__

    out = _cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"autodiffusion-rt {__version__}"
    out = _cli("sample", "--spacing", "cubic")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert all(s in out.stderr for s in registry.SPACINGS)


def test_sample_npy_is_the_float_images_and_logsnr_spacing_runs(tmp_path):
    """--out x.npy holds what sample() returns (float32 NCHW in [-1, 1]); --spacing logsnr uses the model's schedule."""
    import torch

    import autodiffusion_rt as adr
    from autodiffusion_rt.diffusion import uniform_timesteps

    # the CLI on this process's torch threads: a float32 sum split over 1 or 2 threads differs by 1.3e-5 on some
    # CPUs (an AVX-only EPYC here), more than the tolerance
    out = _cli("sample", "--steps", "3", "--spacing", "logsnr", "--n", "3", "--seed", "5",
               "--out", str(tmp_path / "x.npy"), "--quiet", env={"OMP_NUM_THREADS": str(torch.get_num_threads())})
    assert out.returncode == 0, out.stderr
    got = np.load(tmp_path / "x.npy")
    model = adr.load_model("embedded:mnist")
    ts = uniform_timesteps(model.num_timesteps, 3, "logsnr", alphas_cumprod=model.schedule)
    want = adr.sample(model, ts, sampler="ddim", n=3, seed=5).numpy()
    assert got.dtype == np.float32 and got.shape == (3, 1, 28, 28)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert ts != uniform_timesteps(model.num_timesteps, 3, "linear")
