"""Run plainly or under torchrun (CPU, gloo): ``trainer.train(MODEL, OUT, RECIPE, OVERRIDES)`` on one thread.

``--kill-rank R --kill-after S`` makes rank R SIGKILL itself once optimizer step S is done (a process that dies
mid-run: killed, out of memory); ``--resume`` continues OUT from its newest valid checkpoint; ``--record-loads F``
appends "RANK load|skeleton SPEC" to F for every model the trainer's set-up reads (load) or only builds (skeleton);
``--save-logits F``: rank 0 saves the logits of the model ``train`` returned on fixed token ids (torch.save)."""

import argparse
import json
import os
import signal

import torch

torch.set_num_threads(1)

from semisparse.train import trainer  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("recipe")
    p.add_argument("overrides", help="JSON object of dotted recipe fields")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--kill-rank", type=int, default=-1)
    p.add_argument("--kill-after", type=int, default=-1)
    p.add_argument("--record-loads", default=None)
    p.add_argument("--save-logits", default=None)
    args = p.parse_args()
    rank = int(os.environ.get("RANK", "0"))
    if args.record_loads:
        from semisparse.train import setup

        def recorded(kind, original):
            def call(spec, *a, **k):
                with open(args.record_loads, "a") as fh:
                    fh.write(f"{rank} {kind} {spec}\n")
                return original(spec, *a, **k)
            return call

        setup.load_model = recorded("load", setup.load_model)
        setup.load_skeleton = recorded("skeleton", setup.load_skeleton)

    def on_step(step: int) -> None:
        if rank == args.kill_rank and step == args.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    result = trainer.train(args.model, args.out, None if args.resume else args.recipe, json.loads(args.overrides),
                           resume=args.resume, progress=False, on_step=on_step)
    if args.save_logits and rank == 0:
        torch.save(fixed_logits(result.model), args.save_logits)


def fixed_logits(model) -> torch.Tensor:
    """The logits of ``model`` on fixed token ids (the same ids in every caller)."""
    ids = torch.arange(24).remainder(200).reshape(2, 12)
    with torch.no_grad():
        return model(ids).logits


if __name__ == "__main__":
    main()
