"""Numerics: noise schedules (the process), step schedules (the grid) and solvers (the update).

Registries: :data:`SOLVERS` and :data:`STEP_SCHEDULES`, keyed by the names users know from
k-diffusion and ComfyUI (snake_case; older spellings such as ``stein-dpm`` stay as aliases).
Adding a solver = one file plus one ``SOLVERS.add`` line here. Entries name their class as a
``"module:Class"`` string, imported when an entry is built, and the classes below are imported on
first access, so ``from diffsample.solvers import SOLVERS`` (a name check) imports no numerics.
"""

from __future__ import annotations

import importlib

from diffsample.core.registry import Registry, parse_spec

_P = "diffsample.solvers."

# ---- option meanings shared by entries --------------------------------------------------------------

_ETA = "noise scale of each step: 0 deterministic (ODE), 1 ancestral / SDE (stochastic)"
_DPM = {
    "order": "multistep order: 1 (DDIM), 2 (2M) or 3 (3M)",
    "eta": _ETA,
    "solver_type": "second-order term: midpoint (diffusers, k-diffusion) or heun",
    "lower_order_final": "lower the last two steps to orders 1 and 2 on runs under 15 steps (diffusers)",
    "third_order": "3M coefficient: taylor (order 3) or reference (the official code's, order 2)",
}
_UNIPC = {
    "predictor_order": "predictor order p (1-3); order p + 1 with the corrector",
    "variant": "B(h): bh1 (= h) or bh2 (= e^h - 1)",
    "corrector": "apply the UniC corrector (no extra model call)",
    "lower_order_final": "cap the predictor order at the steps left (diffusers' rule)",
}
_STEIN = {
    "eta": "noise scale of the DPM-Solver++(2M) base: 0 deterministic, 1 SDE (stochastic)",
    "probes": "Hutchinson probes per corrected step (>= 1)",
    "probe_dist": "probe distribution: gaussian or rademacher",
    "div_mode": "divergence estimate: vjp (backward pass per probe), jvp or finite_diff",
    "coupling": "what the clean target is: transition (next grid state) or marginal (the paper's x0)",
    "stats": "gamma from batch means (batch) or per sample (per_sample)",
    "gamma_min": "lower clip of gamma (None: unbounded)",
    "gamma_max": "upper clip of gamma (None: unbounded)",
    "apply_steps": "corrected steps: k (the first k), all or all_but_last",
    "param_space": "coordinates of the correction: native or edm (x / alpha, VE sigma)",
    "fd_eps": "finite_diff step, relative to rms(x) (> 0)",
    "seed": "probe seed (step i uses seed + i; None: torch's global generator)",
}
_SIGMA_RANGE = {
    "sigma_min": "smallest VE sigma of the grid (None: the noise schedule's)",
    "sigma_max": "largest VE sigma of the grid (None: the noise schedule's)",
}


def _stein_dpm(eta: float = 0.0, probes: int = 5, probe_dist: str = "gaussian", div_mode: str = "vjp",
               coupling: str = "transition", stats: str = "batch", gamma_min: float | None = 0.5,
               gamma_max: float | None = 2.0, apply_steps: int | str = 1, param_space: str = "native", fd_eps: float = 1e-3,
               seed: int | None = 0):
    """SteinDiff over DPM-Solver++(2M) with noise scale ``eta`` (other options: :class:`SteinDiff`)."""
    from diffsample.solvers.dpm_solver import DPMSolverPP
    from diffsample.solvers.stein import SteinDiff

    return SteinDiff(DPMSolverPP(order=2, eta=eta), **_stein_options(locals()))


def _stein_unipc(probes: int = 5, probe_dist: str = "gaussian", div_mode: str = "vjp", coupling: str = "transition",
                 stats: str = "batch", gamma_min: float | None = 0.5, gamma_max: float | None = 2.0, apply_steps: int | str = 1,
                 param_space: str = "native", fd_eps: float = 1e-3, seed: int | None = 0):
    """SteinDiff over UniPC-bh2 (predictor order 2) (options: :class:`SteinDiff`)."""
    from diffsample.solvers.stein import SteinDiff
    from diffsample.solvers.unipc import UniPC

    return SteinDiff(UniPC(predictor_order=2, variant="bh2"), **_stein_options(locals()))


_STEIN_BASE_NAMES = ("dpmpp_2m", "unipc_bh2", "heun")


def _stein_base(base: str, allowed: tuple[str, ...] = _STEIN_BASE_NAMES):
    """The wrapped solver of a Stein preset, by its registry name."""
    if base not in allowed:
        raise ValueError(f"base must be one of {', '.join(allowed)}; got {base!r}")
    return SOLVERS.create(base)


def _stein_paper(base: str = "dpmpp_2m", gamma_min: float | None = 0.0, probes: int = 5, param_space: str = "native",
                 seed: int | None = 0):
    """SteinDiff as Algorithm 1 of arXiv 2606.07835 states it: marginal coupling, every step, batch
    statistics, Gaussian Hutchinson probes by VJP, gamma clipped from below only (options: :class:`SteinDiff`)."""
    from diffsample.solvers.stein import SteinDiff

    return SteinDiff(_stein_base(base), probes=probes, probe_dist="gaussian", div_mode="vjp", coupling="marginal",
                     stats="batch", gamma_min=gamma_min, gamma_max=None, apply_steps="all", param_space=param_space,
                     seed=seed)


def _stein_lookahead(base: str = "dpmpp_2m", gamma_min: float | None = 0.5, gamma_max: float | None = 2.0,
                     apply_steps: int | str = "all", transport: bool = True):
    """Look-ahead Stein self-consistency correction (a hypothesis for the paper's SC variant;
    options: :class:`~diffsample.solvers.stein_lookahead.SteinLookahead`)."""
    from diffsample.solvers.stein_lookahead import SteinLookahead

    return SteinLookahead(_stein_base(base, ("dpmpp_2m", "dpmpp_3m", "euler", "heun")), gamma_min=gamma_min,
                          gamma_max=gamma_max, apply_steps=apply_steps, transport=transport)


def _stein_options(values: dict) -> dict:
    return {k: values[k] for k in ("probes", "probe_dist", "div_mode", "coupling", "stats", "gamma_min", "gamma_max",
                                   "apply_steps", "param_space", "fd_eps", "seed")}


SOLVERS: Registry = Registry("solver")
SOLVERS.add("euler", _P + "euler:Euler", "Euler / DDIM (eta=0), = DPM-Solver++(1); order 1, 1 NFE/step",
            aliases=("ddim", "k_euler", "sample_euler"), meanings={"eta": _ETA + " (DDIM's eta)"}, eta=0.0)
SOLVERS.add("euler_ancestral", _P + "euler:Euler", "ancestral Euler (eta=1) = DDPM posterior step; stochastic",
            aliases=("ddpm", "k_euler_a", "euler_a", "sample_euler_ancestral"),
            meanings={"eta": _ETA}, eta=1.0)
SOLVERS.add("flow_sde", _P + "flow_sde:FlowSDE",
            "rectified-flow SDE, g = 0.7 sqrt(t/(1-t)) (Flow-GRPO); flow models only; stochastic",
            meanings={"noise_level": "g_t = noise_level sqrt(t / (1 - t)); 0 is the flow ODE's Euler step"},
            noise_level=0.7)
SOLVERS.add("lcm", _P + "consistency:LCM", "LCM multistep consistency sampling: predict x0, re-noise with a fresh "
            "draw (arXiv 2310.04378); few-step students; stochastic",
            meanings={"boundary": "LCM's boundary condition c_skip x + c_out D: None applies it on discrete-VP "
                                  "schedules (as diffusers' LCMScheduler), true demands it, false drops it",
                      "timestep_scaling": "c_skip / c_out time scale s (> 0; diffusers 10)",
                      "sigma_data": "c_skip / c_out data scale (> 0; diffusers 0.5)"})
SOLVERS.add("tcd", _P + "consistency:TCD", "TCD strategic stochastic sampling: jump to s = (1 - gamma) t_next, "
            "re-noise to t_next (arXiv 2402.19159); gamma=0 is DDIM; stochastic for gamma > 0",
            meanings={"gamma": "stochasticity in [0, 1] (diffusers' eta): 0 deterministic (DDIM), 1 re-noise from x0"},
            gamma=0.3)
SOLVERS.add("heun", _P + "heun:Heun", "Heun (EDM Alg. 1, no churn); order 2, 2 NFE/step (1 on the step to sigma=0)",
            aliases=("k_heun", "sample_heun"),
            meanings={"space": "coordinates of the trapezoid: ve (EDM, x / alpha and sigma / alpha) or flow "
                               "(x / (alpha + sigma), sigma / (alpha + sigma); use it with csflow grids)"})
SOLVERS.add("dpmpp_2m", _P + "dpm_solver:DPMSolverPP", "DPM-Solver++(2M) multistep; order 2, 1 NFE/step",
            aliases=("k_dpmpp_2m", "sample_dpmpp_2m"), meanings=_DPM, order=2)
SOLVERS.add("dpmpp_3m", _P + "dpm_solver:DPMSolverPP", "DPM-Solver++(3M) multistep; order 3, 1 NFE/step",
            meanings=_DPM, order=3)
SOLVERS.add("dpmpp_2m_sde", _P + "dpm_solver:DPMSolverPP", "DPM-Solver++(2M) SDE (eta=1, midpoint); stochastic",
            aliases=("dpmpp_2m_sde_gpu", "k_dpmpp_2m_sde", "sample_dpmpp_2m_sde"), meanings=_DPM, order=2, eta=1.0)
SOLVERS.add("dpmpp_2m_sde_heun", _P + "dpm_solver:DPMSolverPP", "DPM-Solver++(2M) SDE, Heun-type second-order term "
            "(eta=1, ComfyUI dpmpp_2m_sde_heun); stochastic", aliases=("dpmpp_2m_sde_heun_gpu", "k_dpmpp_2m_sde_heun"),
            meanings=_DPM, order=2, eta=1.0, solver_type="heun")
SOLVERS.add("dpmpp_3m_sde", _P + "dpm_solver:DPMSolverPP", "DPM-Solver++(3M) SDE (eta=1); stochastic",
            aliases=("dpmpp_3m_sde_gpu", "k_dpmpp_3m_sde", "sample_dpmpp_3m_sde"), meanings=_DPM, order=3, eta=1.0)
SOLVERS.add("dpmpp_2s_ancestral", _P + "dpmpp_2s_ancestral:DPMSolverPP2SAncestral", "DPM-Solver++(2S) + ancestral "
            "noise (k-diffusion sample_dpmpp_2s_ancestral); 2 NFE/step; stochastic (eta=0: order 2)",
            aliases=("k_dpmpp_2s_a", "sample_dpmpp_2s_ancestral"),
            meanings={"eta": _ETA, "s_noise": "scale of the drawn noise (k-diffusion's s_noise)"}, eta=1.0)
SOLVERS.add("dpmpp_sde", _P + "dpmpp_sde:DPMSolverPPSDE", "DPM-Solver++ SDE, single-step, two noisy stages "
            "(k-diffusion sample_dpmpp_sde); 2 NFE/step; stochastic (eta=0: order 2)",
            aliases=("dpmpp_sde_gpu", "k_dpmpp_sde", "sample_dpmpp_sde"),
            meanings={"eta": _ETA, "s_noise": "scale of the drawn noise (k-diffusion's s_noise)",
                      "r": "stage point lambda_i + r h, in (0, 1]",
                      "noise": "brownian (k-diffusion's Brownian-tree law of the two draws) or independent"}, eta=1.0)
SOLVERS.add("sa_solver", _P + "sa_solver:SASolver", "SA-Solver stochastic Adams predictor-corrector (arXiv "
            "2309.05019, diffusers SASolverScheduler); 1 NFE/step; stochastic (tau=0: order min(c, p + 1))",
            meanings={"predictor_order": "Adams-Bashforth predictor order p (1-4)",
                      "corrector_order": "Adams-Moulton corrector order c (1-4; no extra model call)",
                      "tau": "noise of the SDE family: 0 ODE, 1 reverse SDE",
                      "tau_sigma_range": "[low, high] VE sigmas where tau applies (None: every step)",
                      "lower_order_final": "cap the orders at the steps left (diffusers' rule)",
                      "pece": "evaluate the corrected state again (PECE, 2 NFE per corrected step)",
                      "order2_term": "add the O(h^3) UniPC-like term at order 2 (diffusers, official code); "
                                     "false: plain Lagrange weights (ComfyUI)"})
SOLVERS.add("sa_solver_pece", _P + "sa_solver:SASolver", "SA-Solver in PECE mode (ComfyUI sa_solver_pece): the "
            "corrected state is evaluated again, plain Lagrange weights as ComfyUI; 2 NFE/step; stochastic",
            meanings={"predictor_order": "Adams-Bashforth predictor order p (1-4)",
                      "corrector_order": "Adams-Moulton corrector order c (1-4)",
                      "tau": "noise of the SDE family: 0 ODE, 1 reverse SDE",
                      "tau_sigma_range": "[low, high] VE sigmas where tau applies (None: every step)",
                      "lower_order_final": "cap the orders at the steps left (diffusers' rule)",
                      "pece": "evaluate the corrected state again",
                      "order2_term": "add the O(h^3) UniPC-like term at order 2 (diffusers, official code); "
                                     "false: plain Lagrange weights (ComfyUI)"}, pece=True, order2_term=False)
SOLVERS.add("er_sde", _P + "er_sde:ERSDE", "ER-SDE-Solver-3, extended reverse SDE with noise-scale function "
            "(arXiv 2309.06169, ComfyUI er_sde); 1 NFE/step; stochastic (noise_scaler=ode: order 2)",
            meanings={"noise_scaler": "phi: default (s (e^{s^0.3} + 10)), sde (s^2, the reverse SDE) or ode (s, no noise)",
                      "max_stage": "highest Taylor stage: 1, 2 or 3",
                      "third_order": "D' at stage 3: reference (the paper's backward difference, order 2) or taylor "
                                     "(order 3)"})
_SEEDS = {"stages": "2 (SEEDS-2) or 3 (SEEDS-3)", "eta": _ETA, "s_noise": "scale of the drawn noise",
          "r": "SEEDS-2 stage point in (0, 1]", "solver_type": "SEEDS-2 final combination: phi_1 or phi_2",
          "r_1": "SEEDS-3 first stage point", "r_2": "SEEDS-3 second stage point (r_1 < r_2 <= 1)"}
SOLVERS.add("seeds_2", _P + "seeds:SEEDS", "SEEDS-2 exponential SDE solver, data prediction (arXiv 2305.14267, "
            "ComfyUI seeds_2); 2 NFE/step; stochastic (eta=0: order 2)", meanings=_SEEDS, stages=2)
SOLVERS.add("seeds_3", _P + "seeds:SEEDS", "SEEDS-3 exponential SDE solver, data prediction (arXiv 2305.14267, "
            "ComfyUI seeds_3); 3 NFE/step; stochastic (eta=0: order 3)", meanings=_SEEDS, stages=3)
SOLVERS.add("restart", _P + "restart:Restart", "Restart sampling: Heun ODE + forward-noise jumps back up "
            "restart intervals (arXiv 2306.14878); 2 NFE/step + 2 K (N_restart - 1) per interval; stochastic",
            meanings={"segments": "restart intervals [[N_restart, K, t_min, t_max], ...] in VE sigma (the authors' "
                      "and ComfyUI's form; [] is plain Heun)",
                      "s_noise": "scale of the jump noise"})
SOLVERS.add("unipc_bh1", _P + "unipc:UniPC", "UniPC-2 with UniC corrector, B(h)=h; order 3, 1 NFE/step",
            meanings=_UNIPC, predictor_order=2, variant="bh1")
SOLVERS.add("unipc_bh2", _P + "unipc:UniPC", "UniPC-2 with UniC corrector, B(h)=e^h-1; order 3, 1 NFE/step",
            aliases=("unipc",), meanings=_UNIPC, predictor_order=2, variant="bh2")
SOLVERS.add("uni_pc", _P + "unipc:UniPC", "ComfyUI uni_pc: UniPC-3 with UniC corrector, B(h)=h; order 4, 1 NFE/step",
            meanings=_UNIPC, predictor_order=3, variant="bh1")
SOLVERS.add("uni_pc_bh2", _P + "unipc:UniPC", "ComfyUI uni_pc_bh2: UniPC-3 with UniC corrector, B(h)=e^h-1; order 4, "
            "1 NFE/step", meanings=_UNIPC, predictor_order=3, variant="bh2")
SOLVERS.add("ipndm", _P + "ipndm:IPNDM", "iPNDM: uniform-step Adams-Bashforth (up to 4 past eps) in VE sigma "
            "(arXiv 2204.13902, diff-sampler); order 2 on non-uniform grids, 1 NFE/step; few steps of very "
            "unequal size (karras, csflow at NFE 5): prefer ipndm_v",
            meanings={"max_order": "past slopes used (1-4)", "variable": "step-ratio weights (iPNDM_v)"})
SOLVERS.add("ipndm_v", _P + "ipndm:IPNDM", "iPNDM_v: iPNDM with step-ratio weights (diff-sampler ipndm_v); order 2, "
            "1 NFE/step", meanings={"max_order": "past slopes used (1-4)", "variable": "step-ratio weights (iPNDM_v)"},
            variable=True)
SOLVERS.add("deis", _P + "deis:DEIS", "DEIS multistep: eps polynomial in log rho integrated exactly in rho "
            "(arXiv 2204.13902, diffusers DEISMultistepScheduler); order 3, 1 NFE/step", aliases=("deis_multistep",),
            meanings={"order": "past eps used (1-4)", "basis": "interpolation variable: log_rho (diffusers), rho "
                      "(rhoAB, = lms) or tab (a fixed VP time; ComfyUI's deis)",
                      "lower_order_final": "orders 1 and 2 on the last two steps of runs under 15 "
                      "steps (diffusers)"})
SOLVERS.add("lms", _P + "lms:LMS", "LMS: variable-step Adams-Bashforth in VE sigma (k-diffusion sample_lms); order 4, "
            "1 NFE/step", aliases=("k_lms", "sample_lms"), meanings={"order": "past slopes used (1-4)"})
SOLVERS.add("res_multistep", _P + "res_multistep:ResMultistep", "RES two-step multistep, data prediction in lambda "
            "(arXiv 2308.02157, ComfyUI res_multistep); order 2, 1 NFE/step", meanings={"eta": _ETA}, eta=0.0)
SOLVERS.add("res_multistep_ancestral", _P + "res_multistep:ResMultistep", "RES multistep + ancestral noise "
            "(ComfyUI res_multistep_ancestral); stochastic", meanings={"eta": _ETA}, eta=1.0)
SOLVERS.add("dpm_2", _P + "dpm_2:DPM2", "DPM2: midpoint in log sigma (k-diffusion sample_dpm_2); order 2, "
            "2 NFE/step", aliases=("dpm2", "k_dpm_2", "sample_dpm_2"), meanings={"eta": _ETA}, eta=0.0)
SOLVERS.add("dpm_2_ancestral", _P + "dpm_2:DPM2", "DPM2 + ancestral noise (k-diffusion sample_dpm_2_ancestral); "
            "2 NFE/step; stochastic", aliases=("dpm2_ancestral", "dpm2_a", "k_dpm_2_a", "sample_dpm_2_ancestral"),
            meanings={"eta": _ETA}, eta=1.0)
SOLVERS.add("heunpp2", _P + "heunpp:HeunPP2", "Heun++ (ComfyUI heunpp2): Euler/Heun/3-slope blend, sigma-weighted; "
            "order 1, 3 NFE/step", aliases=("heun_pp2",))
SOLVERS.add("gradient_estimation", _P + "gradient_estimation:GradientEstimation", "gradient estimation: Euler + "
            "(gamma - 1)(d - d_prev) (arXiv 2306.04848, ComfyUI); order 1, 1 NFE/step",
            meanings={"gamma": "weight of the current slope (2: the paper's; 1: Euler; 1.5: AB2 on uniform grids)"})
SOLVERS.add("stein_dpm", _stein_dpm, "experimental: DPM-Solver++(2M) + SteinDiff, diffsample's own variant "
            "(transition coupling, first step only, gamma in [0.5, 2]; the paper's Algorithm 1 is stein_paper); "
            "nfe as 2M, +10 model evals; eta=1: the 2M SDE base (stochastic)",
            aliases=("stein-dpm",), meanings=_STEIN)
SOLVERS.add("stein_unipc", _stein_unipc, "experimental: UniPC-bh2 + SteinDiff, diffsample's own variant (transition "
            "coupling, first step only, gamma in [0.5, 2]); nfe as UniPC, +10 model evals", aliases=("stein-unipc",),
            meanings=_STEIN)
SOLVERS.add("stein_paper", _stein_paper, "experimental: SteinDiff as Algorithm 1 of arXiv 2606.07835 states it "
            "(marginal coupling, every step, batch statistics, 5 Gaussian VJP probes, gamma >= gamma_min, no upper "
            "clip); nfe as the base, +10 model evals per base call", aliases=("stein-paper",),
            meanings={"base": "wrapped solver: dpmpp_2m, unipc_bh2 or heun",
                      "gamma_min": "lower clip of gamma (the paper's gamma_min, value unpublished; None: unbounded)",
                      "probes": _STEIN["probes"], "param_space": _STEIN["param_space"], "seed": _STEIN["seed"]})
SOLVERS.add("stein_lookahead", _stein_lookahead, "experimental HYPOTHESIS for SteinDiff's unpublished SC variant "
            "(diffsample's construction): re-corrects each step along its residual so the batch meets the Stein "
            "identity of the next marginal, using the next step's own evaluation; nfe as the base, +2 model evals "
            "per step", aliases=("stein-lookahead",),
            meanings={"base": "wrapped deterministic solver: dpmpp_2m, dpmpp_3m, euler or heun",
                      "gamma_min": "lower clip of gamma (None: unbounded)",
                      "gamma_max": "upper clip of gamma (None: unbounded)",
                      "apply_steps": "re-corrected steps: all, all_but_last or k (the first k)",
                      "transport": "serve the look-ahead output moved to the corrected state to first order "
                                   "(true) or as evaluated (false)"})

STEP_SCHEDULES: Registry = Registry("step schedule")
STEP_SCHEDULES.add("karras", _P + "step_schedules:Karras", "Karras rho=7 on the VE sigma (EDM eq. 5)",
                   meanings={"rho": "warp exponent (7: EDM; 1: uniform in sigma)", **_SIGMA_RANGE})
STEP_SCHEDULES.add("exponential", _P + "step_schedules:LambdaUniform",
                   "uniform in log VE-sigma (k-diffusion get_sigmas_exponential)", meanings=_SIGMA_RANGE)
STEP_SCHEDULES.add("lambda_uniform", _P + "step_schedules:LambdaUniform",
                   "uniform in lambda = half log-SNR (DPM-Solver 'logSNR'); = exponential", meanings=_SIGMA_RANGE)
STEP_SCHEDULES.add("polyexponential", _P + "step_schedules:PolyExponential",
                   "k-diffusion polyexponential (rho=1 is exponential)",
                   meanings={"rho": "log sigma follows ramp**rho (1: exponential)", **_SIGMA_RANGE})
_SPACING = {"spacing": "diffusers timestep spacing: linspace, leading or trailing",
            "steps_offset": "added to 'leading' timesteps (diffusers' steps_offset)"}
STEP_SCHEDULES.add("linspace", _P + "step_schedules:TimeUniform", "uniform in t, diffusers 'linspace' spacing",
                   meanings=_SPACING, spacing="linspace")
STEP_SCHEDULES.add("leading", _P + "step_schedules:TimeUniform", "uniform in t, diffusers 'leading' spacing",
                   meanings=_SPACING, spacing="leading")
STEP_SCHEDULES.add("trailing", _P + "step_schedules:TimeUniform", "uniform in t, diffusers 'trailing' spacing",
                   meanings=_SPACING, spacing="trailing")
STEP_SCHEDULES.add("flow_shift", _P + "step_schedules:FlowShift",
                   "SD3/FLUX shifted time-uniform spacing (rectified flow only), shift=3",
                   meanings={"shift": "t' = shift t / (1 + (shift - 1) t); FLUX: exp(mu) (> 0)",
                             "spacing": "the time-uniform grid shifted: linspace or trailing"})
STEP_SCHEDULES.add("lcm", _P + "lcm_schedule:LCMSchedule",
                   "LCM / TCD student grid: n points of the original_inference_steps grid, evenly spaced in index "
                   "(diffusers LCMScheduler / TCDScheduler; 4 steps: 999, 759, 499, 259)",
                   meanings={"original_inference_steps": "points of the distillation grid (>= the steps asked for)"})
STEP_SCHEDULES.add("csflow", _P + "csflow:CSFlow",
                   "CSFlow: steps where visible frequencies are generated (Barten CSF x data spectrum, arXiv 2606.08833)",
                   meanings={"mix": "weight of the CSF weights vs the default spacing, in [0, 1] (1: CSF only)",
                             "shift": "default spacing warp v -> shift v / (1 + (shift - 1) v) (> 0; 3: SD3-like)",
                             "pixels_per_degree": "viewing geometry in pixels per degree (None: from pixel_size, "
                                                  "viewing_distance)",
                             "pixel_size": "pixel pitch in metres (None: 0.000114)",
                             "viewing_distance": "viewing distance in metres (None: 0.5; 76.55 pixels per degree)",
                             "spectrum": "bundled spectrum name or JSON file (None: the bundled model's, else "
                                         "imagenet_256 with a warning)",
                             "base": "fine grid / default spacing: flow (uniform in alpha/(alpha+sigma), the paper's) "
                                     "or model (uniform in the model's time)"})

STEP_SCHEDULES.add("simple", _P + "step_schedules_table:Simple",
                   "ComfyUI simple: every N/n-th training timestep from the noisiest")
STEP_SCHEDULES.add("normal", _P + "step_schedules_table:Normal",
                   "ComfyUI normal / A1111 uniform: n times uniform over the training range, both ends",
                   aliases=("uniform",), meanings={"sgm": "drop the cleanest point of n + 1 (sgm_uniform)"})
STEP_SCHEDULES.add("sgm_uniform", _P + "step_schedules_table:Normal",
                   "ComfyUI sgm_uniform: linspace(t_max, t_min, n + 1) without its last point",
                   meanings={"sgm": "drop the cleanest point of n + 1 (true here; false: normal)"}, sgm=True)
STEP_SCHEDULES.add("ddim_uniform", _P + "step_schedules_table:DDIMUniform",
                   "ComfyUI ddim_uniform: timesteps 1 + k (N // n) (= diffusers DDIM leading, steps_offset=1)")
STEP_SCHEDULES.add("beta", _P + "step_schedules_table:Beta",
                   "Beta(0.6, 0.6) quantiles of the training timesteps (arXiv 2407.12173, ComfyUI beta)",
                   meanings={"alpha": "Beta distribution alpha (> 0; < 1: more steps at high noise)",
                             "beta": "Beta distribution beta (> 0; < 1: more steps at low noise)"})
STEP_SCHEDULES.add("sd_turbo", _P + "step_schedules_table:SDTurbo",
                   "SD-Turbo: timesteps 999, 899, ..., the first n (ComfyUI SDTurboScheduler; n > 10: trailing)",
                   aliases=("turbo",))
STEP_SCHEDULES.add("kl_optimal", _P + "step_schedules_sigma:KLOptimal",
                   "KL-optimal: uniform in arctan(VE sigma) (AYS Theorem 3.1, arXiv 2404.14507)",
                   meanings=_SIGMA_RANGE)
STEP_SCHEDULES.add("laplace", _P + "step_schedules_sigma:Laplace",
                   "Laplace: log sigma at Laplace(mu, beta) quantiles, clipped to the range (k-diffusion / ComfyUI)",
                   meanings={"mu": "log VE sigma where steps concentrate", "beta": "spread in log sigma (> 0)",
                             **_SIGMA_RANGE})
STEP_SCHEDULES.add("vp", _P + "step_schedules_sigma:VPSigmas",
                   "k-diffusion get_sigmas_vp: uniform in the linear-beta VP-SDE time (cut to the process's range)",
                   meanings={"beta_d": "beta_max - beta_min of the VP SDE (>= 0)", "beta_min": "beta_min (>= 0)",
                             "eps_s": "smallest VP-SDE time, in (0, 1)"})
STEP_SCHEDULES.add("linear_quadratic", _P + "step_schedules_sigma:LinearQuadratic",
                   "Mochi linear-quadratic (ComfyUI linear_quadratic): n//2 small linear steps, then quadratic; "
                   "model sigma = u sigma_max (flow time on rectified flow)",
                   meanings={"threshold_noise": "noise fraction reached by the linear part, in (0, 0.5)",
                             "linear_steps": "points in the linear part, in [1, n - 1] (None: n // 2)"})
STEP_SCHEDULES.add("align_your_steps", _P + "step_schedules_tuned:AlignYourSteps",
                   "Align Your Steps: the paper's tuned sigmas (sd15, sdxl, svd), log-linear to any n "
                   "(arXiv 2404.14507)", aliases=("ays",),
                   meanings={"model": "tuned table: sd15, sdxl or svd (VE sigmas of that model)"})
STEP_SCHEDULES.add("gits", _P + "step_schedules_tuned:GITS",
                   "GITS: the authors' DP schedules for SD 1.5 sigmas, coeff 0.80-1.50, 2-20 steps, log-linear beyond "
                   "(arXiv 2405.11326)", meanings={"coeff": "DP coefficient: 0.80 to 1.50 in steps of 0.05"})
STEP_SCHEDULES.add("sigmas", _P + "step_schedules_explicit:Sigmas",
                   "explicit model sigmas, noisiest first, optional final 0 (VE sigma; flow t on rectified flow); "
                   "steps = their count", aliases=("custom_sigmas",),
                   meanings={"values": "list, e.g. [14.6,6.0,2.0,0.5,0]"})
STEP_SCHEDULES.add("timesteps", _P + "step_schedules_explicit:Timesteps",
                   "explicit times in the noise schedule's unit (diffusers timesteps), noisiest first; "
                   "steps = their count", aliases=("custom_timesteps",),
                   meanings={"values": "list, e.g. [999,850,736,645,545,455,343,233,124,24]"})
STEP_SCHEDULES.add("file", _P + "schedule_file:load_schedule",
                   "a schedule tuned for one model and solver by `diffsample optimize-schedule` (JSON; GITS or LD3); "
                   "steps = its count", meanings={"path": "the JSON file (CLI: --schedule FILE.json)"})

# ---- the numerics, imported on first access ----------------------------------------------------------

_LAZY = {
    "Denoise": "solver", "Grid": "solver", "NoiseFn": "solver", "NoiseSchedule": "solver", "Solver": "solver",
    "DPMSolverPP": "dpm_solver", "Euler": "euler", "FlowSDE": "flow_sde", "Heun": "heun",
    "VE": "noise_schedules", "DiscreteVP": "noise_schedules", "LinearVP": "noise_schedules",
    "RectifiedFlow": "noise_schedules", "SteinDiff": "stein", "SteinLookahead": "stein_lookahead",
    "FlowShift": "step_schedules",
    "Karras": "step_schedules", "LambdaUniform": "step_schedules", "PolyExponential": "step_schedules",
    "TimeUniform": "step_schedules", "fixed": "step_schedules", "UniPC": "unipc",
    "IPNDM": "ipndm", "DEIS": "deis", "LMS": "lms", "ResMultistep": "res_multistep", "DPM2": "dpm_2",
    "HeunPP2": "heunpp", "GradientEstimation": "gradient_estimation",
}

__all__ = ["SOLVERS", "STEP_SCHEDULES", "Registry", "parse_spec", *sorted(_LAZY)]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'diffsample.solvers' has no attribute {name!r}")
    value = getattr(importlib.import_module(_P + module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
