"""Best-of-n sampling: a checkpoint's own samples, ranked by reward functions, as demonstrations and comparisons.

rlhf best-of-n outputs/smollm2/base --prompts prompts/train.jsonl --reward-funcs rlhf.ifeval:ifeval_partial_reward \
    --num-samples 4 --min-score 1 --output outputs/smollm2/samples

Writes `sft.jsonl` (each prompt with its best sample, when that scores at least `min_score`: rejection
sampling), `preference.jsonl` (a better and a worse sample of the same prompt: the judge plays the
labelers), `samples.jsonl` (every sample with its score) and `report.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rlhf.config import RecipeError, load_reward_function


def check_best_of_n(
    checkpoint: str, prompts: str, reward_funcs: list[str], num_samples: int = 4, temperature: float = 0.8, **_: Any
) -> None:
    """The arguments are usable (pipeline pre-flight: the checkpoint and prompts may not exist yet)."""
    if not reward_funcs:
        raise RecipeError("--reward-funcs: give at least one reward function (package.module:function) to rank by.")
    for spec in reward_funcs:
        load_reward_function(spec, "--reward-funcs")
    if num_samples < 2:
        raise RecipeError(f"--num-samples: got {num_samples}; best-of-n needs at least 2 samples per prompt.")
    if temperature <= 0:
        raise RecipeError("--temperature: must be above 0; greedy decoding repeats one answer n times.")


def _pairs(responses: list[str], scores: list[float], most: int) -> list[tuple[str, str]]:
    """Up to `most` (better, worse) pairs of distinct answers, the widest score gaps first."""
    candidates = [
        (scores[i] - scores[j], i, j)
        for i in range(len(scores))
        for j in range(len(scores))
        if scores[i] > scores[j] and responses[i] != responses[j]
    ]
    pairs, used = [], set()
    for _, i, j in sorted(candidates, key=lambda c: -c[0]):
        if (responses[i], responses[j]) not in used:
            used.add((responses[i], responses[j]))
            pairs.append((responses[i], responses[j]))
    return pairs[:most]


def best_of_n(
    checkpoint: str,
    output: str | Path,
    prompts: str,
    reward_funcs: list[str],
    num_samples: int = 4,
    min_score: float | None = None,
    pairs_per_prompt: int = 4,
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_p: float = 1.0,
    batch_size: int = 16,
    seed: int = 0,
    trust_remote_code: bool = False,
) -> Path:
    """Sample `num_samples` answers per prompt, score them with `reward_funcs` (summed), write the four files."""
    from tqdm.auto import tqdm

    from rlhf.artifacts import atomic_output_dir, check_output_dir
    from rlhf.evaluation.generation import generate_responses
    from rlhf.export import load_for_inference, read_prompts
    from rlhf.rewards import completions_for

    check_output_dir(output, "--output", inputs=(checkpoint,), writer="best-of-n")
    check_best_of_n(checkpoint, prompts, reward_funcs, num_samples, temperature)
    if not Path(prompts).is_file():
        raise RecipeError(f"--prompts: {prompts!r} not found; pass a .jsonl file with a `prompt` per line.")
    rows = read_prompts(prompts)
    functions = [load_reward_function(spec, "--reward-funcs") for spec in reward_funcs]
    model, tokenizer = load_for_inference(checkpoint, None, None, trust_remote_code)

    # Each prompt repeated n times in a row: with sampling, each copy is an independent draw.
    repeated = [(row, prompt) for row, prompt in rows for _ in range(num_samples)]
    responses: list[str] = []
    batches = range(0, len(repeated), batch_size)
    for index, start in enumerate(tqdm(batches, desc="sampling", unit="batch", file=sys.stderr)):
        responses += generate_responses(
            model,
            tokenizer,
            [prompt for _, prompt in repeated[start : start + batch_size]],
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            do_sample=True,
            temperature=temperature,
            seed=seed + index,
            top_p=top_p if top_p < 1.0 else None,
        )
    extra = {key: [row.get(key) for row, _ in repeated] for key in repeated[0][0] if key != "prompt"}
    all_prompts = [prompt for _, prompt in repeated]
    completions = completions_for(all_prompts, responses)
    scores = [0.0] * len(responses)
    for function in functions:
        scores = [s + float(r) for s, r in zip(scores, function(prompts=all_prompts, completions=completions, **extra))]

    samples, sft, preference = [], [], []
    for i, (row, prompt) in enumerate(rows):
        own = responses[i * num_samples : (i + 1) * num_samples]
        own_scores = scores[i * num_samples : (i + 1) * num_samples]
        samples.append({**row, "responses": own, "scores": own_scores})
        best = max(range(num_samples), key=lambda k: own_scores[k])
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        if min_score is None or own_scores[best] >= min_score:
            sft.append({"messages": [*messages, {"role": "assistant", "content": own[best]}]})
        for chosen, rejected in _pairs(own, own_scores, pairs_per_prompt):
            preference.append(
                {
                    "prompt": messages,
                    "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}],
                }
            )
    if not sft or not preference:
        raise RecipeError(
            f"best-of-n: {len(sft)} demonstrations and {len(preference)} comparisons from {len(rows)} prompts; "
            "raise --num-samples or --temperature, or lower --min-score, so the samples differ and some pass."
        )
    report = {
        "prompts": len(rows),
        "samples_per_prompt": num_samples,
        "mean_score": sum(scores) / len(scores),
        "best_of_n_mean_score": sum(max(s["scores"]) for s in samples) / len(samples),
        "demonstrations": len(sft),
        "comparisons": len(preference),
        "min_score": min_score,
        "reward_funcs": reward_funcs,
    }
    with atomic_output_dir(output) as tmp:
        for name, data in (("samples", samples), ("sft", sft), ("preference", preference)):
            with open(tmp / f"{name}.jsonl", "w") as handle:
                for item in data:
                    handle.write(json.dumps(item, ensure_ascii=False) + "\n")
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"best-of-{num_samples}: mean score {report['mean_score']:.3f} per sample, {report['best_of_n_mean_score']:.3f} "
        f"for the best; {len(sft)} demonstrations, {len(preference)} comparisons → {output}",
        file=sys.stderr,
    )
    return Path(output)


def main(argv: list[str] | None = None) -> Path:
    """`rlhf best-of-n CHECKPOINT --prompts FILE --reward-funcs F [F ...] --output DIR`: rejection sampling."""
    parser = argparse.ArgumentParser(prog="rlhf best-of-n", description=main.__doc__)
    parser.add_argument("checkpoint")
    parser.add_argument("--prompts", required=True, help="jsonl rows with `prompt`; other columns reach the rewards")
    parser.add_argument("--reward-funcs", nargs="+", required=True, help="package.module:function, scores summed")
    parser.add_argument("--output", required=True)
    parser.add_argument("--num-samples", type=int, default=4)
    parser.add_argument("--min-score", type=float, help="keep a demonstration only when its best sample scores this")
    parser.add_argument("--pairs-per-prompt", type=int, default=4, help="most comparisons drawn from one prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trust-remote-code", action="store_true")
    return best_of_n(**vars(parser.parse_args(argv)))


if __name__ == "__main__":
    from rlhf.entrypoint import run

    run(main)
