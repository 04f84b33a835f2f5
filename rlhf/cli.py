"""`rlhf <command> ...`: dispatch only; the commands and stages are listed in rlhf.registry."""

from __future__ import annotations

import sys

from rlhf.entrypoint import run
from rlhf.registry import COMMANDS, STAGES, stage_of


def train(argv: list[str] | None = None) -> None:
    """Run the stage named by the recipe's `stage:` key."""
    argv = list(sys.argv[2:] if argv is None else argv)
    usage = "usage: rlhf train RECIPE.yaml [--key value ...]   (RECIPE.yaml --help lists its stage's keys)"
    if not argv or argv[0] in ("-h", "--help"):
        width = max(map(len, STAGES))
        stages = "\n".join(f"  {name:<{width}}  data: {stage.data_format}" for name, stage in STAGES.items())
        print(f"{usage}\n\nstages (a recipe names one in its `stage:` key):\n{stages}")
        if not argv:
            raise SystemExit(2)
        return
    stage_of(argv[0]).module.main(argv)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = [f"  {name:<{width}}  {command.help}" for name, command in COMMANDS.items()]
        print("usage: rlhf <command> [args]\n\ncommands:\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nerror: unknown command {argv[0]!r}", file=sys.stderr)
            sys.exit(2)
        return
    command = COMMANDS[argv[0]]
    run(command.load(command.main), argv[1:])


if __name__ == "__main__":
    main()
