"""`python -m sglang_shplb.launch_server`: stock SGLang's server plus the S-HPLB extensions.

Every SGLang server flag is accepted unchanged; `--shplb-*` flags are ours. Without
`--model-path` the default model is prepared and served. On a host without CUDA the CPU platform
is selected with sane defaults; a flag the user gave is never overridden. After validation the
process becomes a thin supervisor (`supervisor.py`, no torch) running `python -m sglang.launch_server`:
it forwards stop signals, leaves no orphans and bounds the wait when a TP worker dies.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys

from .config import PREFILL_DENSE_KV_LEN, ConfigError, ShplbConfig
from .recipe import DEFAULT_MEAN_BUDGET

CPU_MAX_TOTAL_TOKENS = 32768  # bounded KV pool: SGLang would otherwise take ~70% of RAM
# Beyond this many waiting requests SGLang answers 503 "The request queue is full." at once;
# unbounded (stock), a CPU server under a burst queues work it takes hours to reach.
CPU_MAX_QUEUED_REQUESTS = 64


def shplb_parser(add_help: bool = False) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sglang_shplb.launch_server", add_help=add_help,
                                allow_abbrev=False, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("S-HPLB options (everything else is a stock SGLang flag)")
    g.add_argument("--shplb-mean-budget", type=float, help="mean budget of the default recipe (per-head decode and "
                   f"prefill budgets, solved at start-up from the model's profile), in (0, 1] (default "
                   f"{DEFAULT_MEAN_BUDGET:g})")
    g.add_argument("--shplb-dense", action="store_true", help="serve stock dense attention (no S-HPLB)")
    g.add_argument("--shplb-budgets", help="budgets artifact from `python -m sglang_shplb.budget` (per-head budgets)")
    g.add_argument("--shplb-plan", help="plan artifact from `python -m sglang_shplb.plan` (placement + budgets)")
    g.add_argument("--shplb-profile", help="the profile the default recipe is solved from (default: the model's "
                   "committed or cached one; 'auto': profile the model once and cache it); with "
                   "--shplb-uniform-budget: the profile whose calibrated label channels the decode selector reads")
    g.add_argument("--shplb-uniform-budget", type=float, help="a baseline: the same decode budget for every head, "
                   "fraction of context in (0, 1], in place of the recipe")
    g.add_argument("--shplb-uniform-prefill-budget", type=float, help="a baseline: the same prefill budget for "
                   "every head, fraction of causal context in (0, 1] (without it, and without a recipe: dense prefill)")
    g.add_argument("--shplb-page-size", type=int, default=16, help="tokens per selection page (default 16)")
    g.add_argument("--shplb-prefill-dense-kv-len", type=int, default=PREFILL_DENSE_KV_LEN,
                   help="with sparse prefill, a prefill whose KV length (cached prefix + new tokens) is at most N "
                        "attends densely, as SGLang's DSA backend does below 2048 (default %(default)s; 0 = none)")
    g.add_argument("--shplb-selector", default="", help="decode page selector, one of "
                   "sglang_shplb.selection.SELECTORS (default: selection.DEFAULT_SELECTOR when the budgets or "
                   "plan carry the profile's label channels, else selection.UNCALIBRATED_SELECTOR)")
    r = p.add_argument_group("request limits (a request over a limit gets a 400 naming the field and the limit)")
    r.add_argument("--shplb-max-n", type=int, default=128, help="most completions per request, `n` (default 128)")
    r.add_argument("--shplb-max-n-tokens", type=int, default=131072,
                   help="most n x max_tokens per request; max_tokens absent counts as the context length "
                        "(default 131072)")
    r.add_argument("--shplb-max-logprobs", type=int, default=5,
                   help="most `logprobs` in /v1/completions (default 5, as OpenAI)")
    r.add_argument("--shplb-max-top-logprobs", type=int, default=20,
                   help="most chat `top_logprobs` and /generate `top_logprobs_num` (default 20, as OpenAI)")
    return p


def _given(argv: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def _value(argv: list[str], flag: str, default=None):
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return default


def cpu_core_binding(tp: int, cores: list[int]) -> str:
    """SGLANG_CPU_OMP_THREADS_BIND: one core list per rank, round-robin when ranks > cores."""
    return "|".join(str(cores[r % len(cores)]) for r in range(tp))


def cpu_defaults(argv: list[str], cfg: ShplbConfig) -> list[str]:
    """Flags the CPU platform needs, skipping any the user already gave."""
    wanted = {
        "--device": "cpu",
        "--attention-backend": "shplb" if cfg.sparse else "torch_native",
        "--max-total-tokens": str(CPU_MAX_TOTAL_TOKENS),
        "--dtype": "float32",  # fp16/bf16 matmuls are slow and inexact on CPUs without AMX
        "--sleep-on-idle": None,  # an idle scheduler otherwise busy-polls a whole core
        "--max-queued-requests": str(CPU_MAX_QUEUED_REQUESTS),
    }
    extra = []
    for flag, value in wanted.items():
        if not _given(argv, flag):
            extra += [flag] if value is None else [flag, value]
    return extra


def gpu_defaults(argv: list[str], cfg: ShplbConfig) -> list[str]:
    """CUDA with the shplb backend (SGLang 0.5.23 flags): decode CUDA graphs stay on (the backend captures
    them over fixed buffers); prefill graphs, on by default in 0.5.23, are turned off because our extend
    runs eagerly. The memory fraction for the page metadata is lowered by the plugin's server-args hook
    (it knows SGLang's resolved default)."""
    from .sglang_adapter.gpu_startup import MIN_GPU_PAGE

    if cfg.page_size < MIN_GPU_PAGE:
        _fail(f"--shplb-page-size {cfg.page_size} is below {MIN_GPU_PAGE}, the smallest page the GPU kernels take; "
              f"use --shplb-page-size {MIN_GPU_PAGE}")
    if _given(argv, "--cuda-graph-backend-prefill") or _given(argv, "--disable-cuda-graph"):
        return []
    print("[sglang-shplb] CUDA: decode CUDA graphs on; prefill CUDA graphs off (--cuda-graph-backend-prefill "
          "disabled): the shplb extend runs eagerly", flush=True)
    return ["--cuda-graph-backend-prefill", "disabled"]


ATTENTION_FLAGS = ("--attention-backend", "--prefill-attention-backend", "--decode-attention-backend")


def _cuda_serving() -> bool:
    """True to serve on CUDA; one error line when this is a GPU install that cannot use its GPU (never a quiet
    fall back to a CPU path the install was not built for)."""
    from .sglang_adapter.platform_check import cuda_problem, cuda_usable

    if cuda_usable()[0]:
        return True
    problem = cuda_problem()
    if problem:
        _fail(problem)
    return False


def flashinfer_fallback(argv: list[str]) -> list[str]:
    """On CUDA without a way to build FlashInfer's kernels: SGLang's Triton attention and PyTorch sampling
    (said in one line), or one error line when the user asked for FlashInfer by name."""
    from .sglang_adapter.platform_check import flashinfer_unbuildable

    why = flashinfer_unbuildable()
    if why is None:
        return []
    asked = [f for f in ATTENTION_FLAGS + ("--sampling-backend",) if _value(argv, f) == "flashinfer"]
    if asked:
        _fail(f"{asked[0]} flashinfer: {why}; or pick another backend")
    extra = [] if _given(argv, "--attention-backend") else ["--attention-backend", "triton"]
    extra += [] if _given(argv, "--sampling-backend") else ["--sampling-backend", "pytorch"]
    if extra:
        print(f"[sglang-shplb] {why}: serving with {' '.join(extra)} instead", flush=True)
    return extra


def _refuse_unsupported(argv: list[str]) -> None:
    """SGLang settings the shplb backend cannot serve, refused before SGLang starts (the workers check again)."""
    import argparse
    import contextlib
    import io

    from sglang.srt.server_args import ServerArgs, add_attention_backend_choices

    from .sglang_adapter.refusals import server_problems

    add_attention_backend_choices(["shplb"])   # what the plugin does in SGLang's own processes
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    ServerArgs.add_cli_args(parser)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            args, _ = parser.parse_known_args(argv)
    except (SystemExit, argparse.ArgumentError):   # SGLang itself will name the bad flag
        return
    problems = server_problems(args)
    if problems:
        _fail("; ".join(problems))


def _fail(msg: str) -> "NoReturn":  # noqa: F821
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def _check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        # SO_REUSEADDR like SGLang's own listener: connections of a just-stopped server in
        # TIME_WAIT must not block a restart; a live listener still fails the bind.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            _fail(f"cannot listen on {host}:{port} ({e.strerror}); pass --port N or stop the process using it")


def _check_model_path(path: str) -> None:
    looks_local = path.startswith(("/", ".", "~")) or os.environ.get("HF_HUB_OFFLINE") == "1"
    if looks_local and not os.path.isdir(os.path.expanduser(path)):
        _fail(f"model path {path} does not exist; give a checkpoint directory, or omit --model-path "
              "to serve the default model")


def _tp_size(argv: list[str]) -> int:
    raw = _value(argv, "--tp", None) or _value(argv, "--tp-size", "1")
    try:
        return int(raw)
    except ValueError:
        _fail(f"--tp {raw} is not an integer; pass the number of tensor-parallel ranks, e.g. --tp 3")


def _check_tp_divides_heads(argv: list[str], cfg: ShplbConfig, model_path: str) -> None:
    """S-HPLB budgets and places whole heads per rank. Stock SGLang on CPU pads heads when tp does
    not divide them (dense serving works), but padded ranks would get other heads' budgets."""
    if not cfg.sparse or not os.path.isfile(os.path.join(os.path.expanduser(model_path), "config.json")):
        return
    from .artifacts import model_shape

    tp, shape = _tp_size(argv), model_shape(os.path.expanduser(model_path))
    q, kv = shape["num_attention_heads"], shape["num_key_value_heads"]
    if tp < 1 or q % tp or (kv % tp and tp % kv):
        ok = [t for t in range(1, q + 1) if q % t == 0 and (kv % t == 0 or t % kv == 0)]
        _fail(f"--tp {tp} does not divide the model's {q} query heads / {kv} KV heads, which S-HPLB "
              f"needs (whole heads per rank); use --tp {' or '.join(map(str, ok))}, or drop the --shplb-* flags")


def _shplb_page_size(argv: list[str], cfg: ShplbConfig) -> list[str]:
    """SGLang must allocate whole selection pages, so its page size is a multiple of ours."""
    given = _value(argv, "--page-size")
    if given is None:
        return ["--page-size", str(cfg.page_size)]
    if int(given) % cfg.page_size:
        _fail(f"--page-size {given} is not a multiple of --shplb-page-size {cfg.page_size}; "
              f"use --page-size {cfg.page_size} (or a multiple)")
    return []


def _apply_artifacts(cfg: ShplbConfig, model_path: str, argv: list[str]) -> list[str]:
    """Refuse budgets/plans/profiles made for another model or TP size (at start-up, never mid-request),
    and pass the config overrides a plan's weights need (GQA expansion) to SGLang."""
    if not (cfg.budgets or cfg.plan or cfg.profile) or not os.path.isdir(os.path.expanduser(model_path)):
        return argv
    from .artifacts import ArtifactError, model_fingerprint, model_shape
    from .serving import rank_budgets

    tp = _tp_size(argv)
    shape = model_shape(model_path)
    kv_heads = shape["num_key_value_heads"]
    try:
        if cfg.plan:
            from .permute import model_overrides
            from .plan import check_plan, load_plan

            plan = load_plan(cfg.plan)
            try:
                check_plan(plan, model_path, tp)
            except ArtifactError as e:  # check_plan knows the plan, not its file: name it
                raise ArtifactError(f"--shplb-plan {cfg.plan}: {e}") from None
            kv_heads = plan.get("served_num_kv_heads", kv_heads)
            argv = _merge_overrides(argv, model_overrides(plan))
        fingerprint = None if cfg.plan else model_fingerprint(model_path)  # check_plan did it for plans
        for rank in range(tp):
            rank_budgets(cfg, shape["num_hidden_layers"], kv_heads, tp, rank, fingerprint)
    except ArtifactError as e:
        _fail(str(e))
    return argv


def _merge_overrides(argv: list[str], overrides: dict) -> list[str]:
    if not overrides:
        return argv
    import json

    flag = "--json-model-override-args"
    user = json.loads(_value(argv, flag, "{}") or "{}")
    clash = {k for k in overrides if k in user and user[k] != overrides[k]}
    if clash:
        _fail(f"{flag} sets {sorted(clash)}, which the plan needs as {overrides}; drop them from {flag}")
    kept = [a for i, a in enumerate(argv) if not (a == flag or a.startswith(flag + "=")
                                                  or (i > 0 and argv[i - 1] == flag))]
    return kept + [flag, json.dumps({**user, **overrides})]


# a config given by hand: no default recipe
RECIPE_FLAGS = ("uniform_budget", "budgets", "plan", "uniform_prefill_budget")


def _options(argv: list[str]) -> tuple[dict, list[str]]:
    """(our options by ShplbConfig field, plus mean_budget and dense; SGLang's argv)."""
    if "-h" in argv or "--help" in argv:
        from sglang.srt.server_args import ServerArgs

        parser = shplb_parser(add_help=True)
        ServerArgs.add_cli_args(parser.add_argument_group("SGLang server options"))
        parser.print_help()
        sys.exit(0)
    ours, rest = shplb_parser().parse_known_args(argv)
    unknown = [a for a in rest if a.startswith("--shplb")]
    if unknown:
        _fail(f"unknown option {unknown[0]}; see --help for the --shplb-* options")
    return {k[len("shplb_"):]: v for k, v in vars(ours).items()}, rest


def _serves_recipe(options: dict, rest: list[str]) -> bool:
    """The default recipe unless dense is asked for (--shplb-dense, or another --attention-backend by name) or a
    budget is given by hand; the flags that only make sense with one or the other are refused."""
    by_hand = [f for f in RECIPE_FLAGS if options[f] is not None]
    other_backend = _value(rest, "--attention-backend") not in (None, "shplb")
    if options["dense"] and by_hand:
        _fail(f"--shplb-dense serves stock attention; drop --shplb-{by_hand[0].replace('_', '-')}")
    recipe = not (options["dense"] or by_hand or other_backend)
    mean = options["mean_budget"]
    if mean is not None and not recipe:
        why = "--shplb-dense" if options["dense"] else (f"--shplb-{by_hand[0].replace('_', '-')}" if by_hand else
                                                       f"--attention-backend {_value(rest, '--attention-backend')}")
        _fail(f"--shplb-mean-budget sets the default recipe's mean, which {why} replaces; drop one of them")
    if mean is not None and not 0.0 < mean <= 1.0:
        _fail(f"--shplb-mean-budget must be in (0, 1], got {mean}")
    return recipe


def _config(options: dict, recipe: bool) -> ShplbConfig:
    from .artifacts import ArtifactError
    from .serving import decode_selector

    fields = {k: v for k, v in options.items() if k not in ("mean_budget", "dense")}
    if recipe:
        fields["profile"] = None        # the recipe's profile, not a uniform budget's label channels
    try:
        cfg = ShplbConfig(**fields)
        if not (cfg.budgets or cfg.plan or cfg.profile or recipe):   # artifacts: checked in _apply_artifacts
            decode_selector(cfg)            # a selector this config cannot serve is refused here, not in a worker
    except (ConfigError, ArtifactError) as e:
        _fail(str(e))
    return cfg


def _with_model_path(rest: list[str]) -> list[str]:
    if not (_given(rest, "--model-path") or _given(rest, "--model")):
        from .models import PrepareError, prepare_model

        try:
            rest = ["--model-path", str(prepare_model())] + rest
        except PrepareError as e:
            _fail(f"could not prepare the default model: {e}")
    _check_model_path(_value(rest, "--model-path") or _value(rest, "--model"))
    return rest


def _apply_recipe(cfg: ShplbConfig, options: dict, rest: list[str]) -> ShplbConfig:
    """Solve the default recipe for this model and TP size; the config then serves its artifact."""
    import dataclasses

    from .artifacts import ArtifactError, model_fingerprint, model_shape
    from .recipe import resolve_profile, solve

    model = os.path.expanduser(_value(rest, "--model-path") or _value(rest, "--model"))
    if not os.path.isfile(os.path.join(model, "config.json")):
        _fail(f"the default recipe needs a local checkpoint directory (with config.json) to find its profile, got "
              f"{model}; pass --shplb-dense, or budgets made with `python -m sglang_shplb.budget` (--shplb-budgets)")
    try:
        fingerprint = model_fingerprint(model)
        profile = resolve_profile(options["profile"], model, fingerprint)
        recipe = solve(profile, options["mean_budget"] or DEFAULT_MEAN_BUDGET, _tp_size(rest), fingerprint,
                       model_shape(model)["head_dim"])
    except ArtifactError as e:
        _fail(str(e))
    print(f"[sglang-shplb] {recipe.describe()}", flush=True)
    return dataclasses.replace(cfg, **{recipe.kind: str(recipe.path)})


def build(argv: list[str]) -> tuple[list[str], dict[str, str], str]:
    """Validate and return (sglang argv, environment, URL). Exits with one error line on bad input."""
    options, rest = _options(argv)
    recipe = _serves_recipe(options, rest)
    cfg = _config(options, recipe)
    rest = _with_model_path(rest)
    if recipe:
        _check_tp_divides_heads(rest, ShplbConfig(uniform_budget=1.0),
                                _value(rest, "--model-path") or _value(rest, "--model"))
        cfg = _apply_recipe(cfg, options, rest)
    elif not cfg.sparse:
        print("[sglang-shplb] serving stock dense attention (no S-HPLB)", flush=True)

    env = dict(os.environ)
    env["SGLANG_SHPLB_CONFIG"] = cfg.to_env()
    cuda = _cuda_serving()
    if not cuda:
        env["SGLANG_USE_CPU_ENGINE"] = "1"
        env.setdefault("OMP_NUM_THREADS", "1")  # 2-core hosts: more threads make decode erratic
        rest = rest + cpu_defaults(rest, cfg)
        tp = _tp_size(rest)
        if tp > 1 and "SGLANG_CPU_OMP_THREADS_BIND" not in env:
            env["SGLANG_CPU_OMP_THREADS_BIND"] = cpu_core_binding(tp, sorted(os.sched_getaffinity(0)))
    elif cfg.sparse and not _given(rest, "--attention-backend"):
        rest = rest + ["--attention-backend", "shplb"]
    if cuda:
        rest = rest + flashinfer_fallback(rest)
    if _value(rest, "--attention-backend") == "shplb":
        rest = rest + _shplb_page_size(rest, cfg)
        if cuda:
            rest = rest + gpu_defaults(rest, cfg)
    if "shplb" in {_value(rest, f) for f in ATTENTION_FLAGS}:
        _refuse_unsupported(rest)
    _check_tp_divides_heads(rest, cfg, _value(rest, "--model-path") or _value(rest, "--model"))
    rest = _apply_artifacts(cfg, _value(rest, "--model-path") or _value(rest, "--model"), rest)

    host = _value(rest, "--host", "127.0.0.1")
    port = int(_value(rest, "--port", "30000"))
    if not _given(rest, "--host"):
        rest += ["--host", host]
    _check_port_free(host, port)
    return rest, env, f"http://{host}:{port}"


def main(argv: list[str] | None = None) -> None:
    sglang_argv, env, url = build(sys.argv[1:] if argv is None else argv)
    print(f"[sglang-shplb] serving at {url} (OpenAI API: {url}/v1)", flush=True)
    server = [sys.executable, "-m", "sglang.launch_server", *sglang_argv]
    # exec: the supervisor keeps our pid (what the caller signals) and drops torch from memory
    os.execvpe(sys.executable, [sys.executable, "-m", "sglang_shplb.supervisor", "--", *server], env)


if __name__ == "__main__":
    main()
