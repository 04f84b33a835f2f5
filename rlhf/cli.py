"""`rlhf <command> ...`: dispatch only; the commands and stages are listed in rlhf.registry.

Nothing heavy is imported here: a command's module loads when it runs, so `--help` answers at once.
"""

from __future__ import annotations

import sys

from rlhf.entrypoint import run
from rlhf.quiet import VERBOSE_ENV, show_everything
from rlhf.registry import COMMANDS, STAGES, stage_of

VERBOSE_FLAG = "--verbose"


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
    stage = stage_of(argv[0])
    if "-h" in argv[1:] or "--help" in argv[1:]:
        print(stage.recipe_help(), end="")
        return
    stage.module.main(argv)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if VERBOSE_FLAG in argv:  # before the command or among its arguments
        argv.remove(VERBOSE_FLAG)
        show_everything()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = [f"  {name:<{width}}  {command.help}" for name, command in COMMANDS.items()]
        print(
            f"usage: rlhf [{VERBOSE_FLAG}] <command> [args]\n\ncommands:\n"
            + "\n".join(lines)
            + f"\n\n{VERBOSE_FLAG} (or {VERBOSE_ENV}=1) also shows the libraries' start-up logs and warnings."
        )
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nerror: unknown command {argv[0]!r}", file=sys.stderr)
            sys.exit(2)
        return
    command = COMMANDS[argv[0]]
    run(command.load(command.main), argv[1:])


if __name__ == "__main__":
    main()
