"""Prompt tuning the bundled model to write restaurant descriptions: RANDOM vs TEXT initialisation.

stories260k only knows children's stories. Prompt tuning learns a few virtual-token embeddings that
are put in front of every input, nothing else. Two runs on the bundled E2E NLG data: the prompt
initialised at random, and initialised from the embeddings of a text ("Describe the restaurant: its
name, food, price and area."). Prints the eval loss before and after, a generation of each, and the
time taken.

    python examples/prompt_tuning_restaurants.py [--steps 150]
"""

from __future__ import annotations

import argparse
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args()
    from peftkit.train import RunConfig, method_names, train

    if "prompt-tuning" not in method_names():
        raise SystemExit("This peftkit has no prompt tuning method registered.")
    start = time.perf_counter()
    init_text = "Describe the restaurant: its name, food, price and area."
    results = {}
    for init in ("RANDOM", "TEXT"):
        t0 = time.perf_counter()
        method_args = {"num_virtual_tokens": 16, "prompt_tuning_init": init}
        if init == "TEXT":
            method_args["prompt_tuning_init_text"] = init_text  # tokenizer: the model's own
        with tempfile.TemporaryDirectory() as out:
            run = RunConfig.from_dict({
                "method": "prompt-tuning", "method_args": method_args, "output_dir": out, "max_steps": args.steps,
                "lr": 0.03, "eval_steps": 0, "save_steps": 0, "num_generations": 2, "eval_generate_samples": 16,
                "max_eval_samples": 100, "progress": False, "seed": 0,
            })
            print(f"\n######## prompt tuning, {init} init")
            result = train(run)
        results[init] = (result.metrics_before, result.metrics_after, time.perf_counter() - t0)
    print("\n== summary (eval on 100 held-out restaurants)")
    for init, (before, after, seconds) in results.items():
        print(f"   {init:<6} eval_loss {before['eval_loss']:.3f} -> {after['eval_loss']:.3f}   "
              f"ROUGE-L {before.get('eval_rouge_l', 0):.3f} -> {after.get('eval_rouge_l', 0):.3f}   ({seconds:.0f} s)")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
