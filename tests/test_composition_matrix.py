"""The composition contract (docs/design.md, "Composition"), checked over every registered guidance
term x a set of solvers x the three paths on a tiny DDPM pipeline:

* ``generate`` (the CLI's path: ``diffsample.generate`` on the pipeline's saved folder),
* the native loop (``sample_pipeline``),
* ``attach`` (the pipeline's own loop over the scheduler shim).

For each combination every path either gives the same samples as the native loop (to 1e-5, same
noise), or refuses before any sampling with one line; and a term that runs changes the samples
(a silent no-op -- what ``attach`` did with NoiseTilt before -- fails here).
"""

import functools
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import diffsample  # noqa: E402
from diffsample import GUIDANCE, attach, detach, sample_pipeline  # noqa: E402
from diffsample.run.models import load_model  # noqa: E402
from diffsample.samplers.seeds import SeededNoiseFn, seeded_chain, seeded_noise  # noqa: E402
from diffsample.testbed import tiny_pipelines as tp  # noqa: E402

STEPS, BATCH, SEED = 4, 2, 0
SHAPE = (3, 8, 8)
TOL = 1e-5

# One spec per registered term, with options that make it runnable on an unconditional pixel model
# where it can be (the ink reward needs no classifier). Terms that need what the tiny DDPM model lacks
# (a condition, a classifier, a ratio file) must be refused on every path.
TERMS = {
    "none": "none",
    "cfg": "cfg:scale=3",
    "cfg_rescale": "cfg_rescale",
    "apg": "apg",
    "cfgpp": "cfgpp",
    "cfg_zero_star": "cfg_zero_star",
    "classifier": "classifier",
    "jeffrey": "jeffrey:target=[0:0.5,1:0.5]",
    "jeffrey_embedding": "jeffrey_embedding",
    "noisetilt": "noisetilt:reward=ink,rho=constant,strength=0.5",
    "dps": "dps:reward=ink,scale=20",
    "freedom": "freedom:reward=ink,scale=20",
    "svdd": "svdd:reward=ink,particles=3",
    "best_of_n": "best_of_n:reward=ink,n=3",
}
SOLVERS = ["dpmpp_2m", "euler_ancestral", "heun", "stein-dpm"]


def test_every_registered_term_is_in_the_matrix():
    assert set(TERMS) == set(GUIDANCE.names())


@functools.lru_cache(maxsize=None)
def _pipe():
    return tp.build("ddpm")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("ddpm")
    _pipe().save_pretrained(path, safe_serialization=True)
    return str(path)


def _outcome(fn):
    """``("ok", samples)`` or ``("refused", message)`` for a ``ValueError``."""
    try:
        return "ok", fn()
    except ValueError as exc:
        return "refused", str(exc)


@functools.lru_cache(maxsize=None)
def _loaded(folder):
    return load_model(folder)


def _generate(folder, solver, spec):
    result = diffsample.generate(_loaded(folder), solver=solver, schedule="trailing", steps=STEPS, guidance=[spec],
                                 num_samples=BATCH, batch_size=BATCH, seed=SEED)
    return result.samples, result.record


def _native_seeded(solver, spec):
    seeds = list(range(SEED, SEED + BATCH))
    out = sample_pipeline(_pipe(), None, solver=solver, schedule="trailing", steps=STEPS, guidance=[spec],
                          num_images_per_prompt=BATCH, noise=seeded_noise(seeds, SHAPE),
                          noise_fn=SeededNoiseFn(seeds, SHAPE), chain_noise=functools.partial(seeded_chain, seeds, SHAPE),
                          output_type="latent")
    return out.latents.float(), out


def _native_generator(solver, spec):
    """The native loop drawing exactly as the pipeline's own loop does through attach: the initial
    noise, then every stochastic step's noise, from one generator."""
    gen = torch.Generator().manual_seed(SEED)
    noise = torch.randn((BATCH,) + SHAPE, generator=gen)
    out = sample_pipeline(_pipe(), None, solver=solver, steps=STEPS, guidance=[spec], num_images_per_prompt=BATCH,
                          noise=noise, noise_fn=lambda s, s_next: torch.randn((BATCH,) + SHAPE, generator=gen),
                          output_type="pt")
    return out.images.float()


@functools.lru_cache(maxsize=None)
def _plain_native(solver):
    return _native_seeded(solver, "none")[0]


@functools.lru_cache(maxsize=None)
def _plain_attached(solver):
    return _attached(solver, "none")


def _attached(solver, spec):
    pipe = _pipe()
    attach(pipe, solver, guidance=[spec])
    try:
        images = pipe(batch_size=BATCH, num_inference_steps=STEPS, output_type="np",
                      generator=torch.Generator().manual_seed(SEED)).images
    finally:
        detach(pipe)
    return torch.as_tensor(images).permute(0, 3, 1, 2).float()


def _attach_refusal(solver, spec):
    """attach's verdict without sampling: ``None`` when it accepts, else the message."""
    pipe = _pipe()
    try:
        attach(pipe, solver, guidance=[spec])
    except ValueError as exc:
        return str(exc)
    detach(pipe)
    return None


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("term", sorted(TERMS))
def test_term_solver_paths_agree_or_refuse(folder, solver, term):
    spec = TERMS[term]
    gen_kind, gen_out = _outcome(lambda: _generate(folder, solver, spec))
    nat_kind, nat_out = _outcome(lambda: _native_seeded(solver, spec))
    refusal = _attach_refusal(solver, spec)
    for kind, out in ((gen_kind, gen_out), (nat_kind, nat_out)):
        if kind == "refused":
            assert "\n" not in out and len(out) < 400, f"not a one-line refusal: {out!r}"
    if refusal is not None:
        assert "\n" not in refusal and len(refusal) < 400
    # generate and the native loop are one path over the same model: same verdict, same samples
    assert gen_kind == nat_kind, f"generate {gen_kind} ({gen_out if gen_kind == 'refused' else ''}) vs native " \
                                 f"{nat_kind} ({nat_out if nat_kind == 'refused' else ''})"
    if gen_kind == "ok":
        assert rel(gen_out[0], nat_out[0]) <= TOL, f"generate vs native: {rel(gen_out[0], nat_out[0]):.2e}"
        assert gen_out[1]["solver"] == str(nat_out[1].solver), "the two paths ran different solvers"
    # attach: same samples as the native loop drawing the same noise, or refused before sampling
    if refusal is None:
        assert nat_kind == "ok", f"attach accepts what the native loop refuses: {nat_out}"
        ours = _attached(solver, spec)
        ref = _native_generator(solver, spec)
        assert rel(ours, ref) <= TOL, f"attach vs native: {rel(ours, ref):.2e}"
    # a term that runs changes the samples (no silent no-op)
    if term != "none" and nat_kind == "ok":
        assert rel(nat_out[0], _plain_native(str(nat_out[1].solver))) > 1e-4, f"{term} left the samples unchanged"
        if refusal is None:
            assert rel(ours, _plain_attached(str(nat_out[1].solver))) > 1e-4, \
                f"{term} through attach left the samples unchanged"
