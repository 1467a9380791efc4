"""docs/parity.md: every peer name it maps resolves. Each table row names a peer sampler or scheduler,
the diffsample spec(s) it maps to (``--solver SPEC``, ``--schedule SPEC``, ``--guidance SPEC``) or
**missing**, and whether the peer's own name is a registry name or alias ("yes")."""

import re
from pathlib import Path

import pytest

from diffsample.guidance import GUIDANCE
from diffsample.solvers import SOLVERS, STEP_SCHEDULES

DOC = Path(__file__).resolve().parents[2] / "docs" / "parity.md"
REGISTRY = {"solver": SOLVERS, "schedule": STEP_SCHEDULES, "guidance": GUIDANCE}

# The peers' lists as their sources define them (ComfyUI comfy/samplers.py KSAMPLER_NAMES + SAMPLER_NAMES
# extras, SCHEDULER_HANDLERS; k-diffusion k_diffusion/sampling.py): every one must have a row.
COMFY_SAMPLERS = [
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "exp_heun_2_x0",
    "exp_heun_2_x0_sde", "dpm_2", "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral",
    "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde",
    "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm",
    "lcm", "ipndm", "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp", "res_multistep_ancestral",
    "res_multistep_ancestral_cfg_pp", "gradient_estimation", "gradient_estimation_cfg_pp", "er_sde", "seeds_2",
    "seeds_3", "sa_solver", "sa_solver_pece", "ddim", "uni_pc", "uni_pc_bh2"]
COMFY_SCHEDULERS = ["simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
                    "linear_quadratic", "kl_optimal"]
KDIFF = ["sample_euler", "sample_euler_ancestral", "sample_heun", "sample_dpm_2", "sample_dpm_2_ancestral",
         "sample_lms", "sample_dpm_fast", "sample_dpm_adaptive", "sample_dpmpp_2s_ancestral", "sample_dpmpp_sde",
         "sample_dpmpp_2m", "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde", "get_sigmas_karras", "get_sigmas_exponential",
         "get_sigmas_polyexponential", "get_sigmas_vp"]
# Names the issue asks to work as they are typed.
ISSUE_ALIASES = {"solver": ["dpmpp_2m_sde_gpu", "uni_pc_bh2", "uni_pc", "k_euler"],
                 "schedule": ["align_your_steps", "karras"]}


def rows() -> list[dict]:
    out = []
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) != 4 or set(cells[0]) <= set("-") or cells[2] == "peer name works":
            continue
        names = re.findall(r"`([^`]+)`", cells[0])
        specs = [(kind, spec) for span in re.findall(r"`([^`]+)`", cells[1])
                 for kind, spec in re.findall(r"--(solver|schedule|guidance) (\S+)", span)]
        out.append(dict(peer=cells[0], names=names, specs=specs, missing="**missing**" in cells[1],
                        works=cells[2], line=line))
    return out


ROWS = rows()


def test_the_page_has_its_tables():
    assert len(ROWS) > 150
    assert all(r["works"] in ("yes", "no") for r in ROWS), [r["line"] for r in ROWS if r["works"] not in ("yes", "no")]


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r["peer"][:60])
def test_every_row_resolves(row):
    if row["missing"]:
        assert not row["specs"] and row["works"] == "no", row["line"]
        return
    assert row["specs"] or "default" in row["line"], row["line"]
    for kind, spec in row["specs"]:
        if kind == "guidance":
            GUIDANCE.check(spec)
        else:
            REGISTRY[kind].create(spec)
    if row["works"] == "yes":
        kind = row["specs"][0][0]
        for name in row["names"]:
            assert name in REGISTRY[kind], f"{name!r} does not resolve as a {kind}: {row['line']}"
            assert REGISTRY[kind].canonical(name) == REGISTRY[kind].canonical(row["specs"][0][1].split(":")[0])


def test_every_peer_name_has_a_row():
    named = {n for r in ROWS for n in r["names"]}
    for name in COMFY_SAMPLERS + COMFY_SCHEDULERS + KDIFF:
        assert name in named, f"{name} has no row in docs/parity.md"


@pytest.mark.parametrize("kind", list(ISSUE_ALIASES))
def test_issue_names_resolve(kind):
    for name in ISSUE_ALIASES[kind]:
        assert name in REGISTRY[kind]


def test_comfy_names_with_a_diffsample_equivalent_are_registry_names():
    for name in COMFY_SAMPLERS:
        row = next(r for r in ROWS if name in r["names"] and any(k == "solver" for k, _ in r["specs"]) or
                   name in r["names"] and r["missing"])
        if not row["missing"] and "guidance" not in {k for k, _ in row["specs"]}:
            assert name in SOLVERS, name
    for name in COMFY_SCHEDULERS:
        assert name in STEP_SCHEDULES, name
