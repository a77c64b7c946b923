"""The `workbench` command: each verb lives in its own module under workbench/commands/."""

from __future__ import annotations

import sys

import typer

from sae.errors import SAEError
from workbench.errors import WorkbenchError

app = typer.Typer(
    help="Capture activations, train sparse autoencoders, browse sparse features.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

#: The base of click's usage errors in the click typer runs on (newer typer vendors its own
#: copy, whose classes are not the click package's), found through one typer re-exports.
CLICK_ERROR = next(base for base in typer.BadParameter.__mro__ if base.__name__ == "ClickException")


def _register() -> None:
    """Attach every command module's verbs to the app (imported here, when the command runs)."""
    from workbench.commands.analyze import analyze_command
    from workbench.commands.app import app_command
    from workbench.commands.capture import capture_command, hooks_command, info_command
    from workbench.commands.demo import demo_command
    from workbench.commands.export import export_neuronpedia_command
    from workbench.commands.features import features_command
    from workbench.commands.links import links_command
    from workbench.commands.train import eval_command, train_command, with_rule_options
    from workbench.commands.zoo import zoo_app

    app.command("demo")(demo_command)
    app.add_typer(zoo_app, name="zoo")
    app.command("capture")(capture_command)
    app.command("info")(info_command)
    app.command("hooks")(hooks_command)
    app.command("analyze")(analyze_command)
    app.command("train")(with_rule_options(train_command))
    app.command("eval")(eval_command)
    app.command("features")(features_command)
    app.command("links")(links_command)
    app.command("export-neuronpedia")(export_neuronpedia_command)
    app.command("app")(app_command)


def flag_message(err: SAEError, argv: list[str]) -> str:
    """The SAE library's message in the words of the command argv runs: each parameter that
    command has as an option becomes its flag (`k=20` -> --k 20, `resume` -> --resume)."""
    from workbench.commands.train import flag

    command = typer.main.get_command(app)
    for word in argv:  # down the groups (`workbench zoo train`) to the command run
        if word not in getattr(command, "commands", {}):
            break
        command = command.commands[word]
    options = {name for param in command.params for name in param.opts}

    def spell(name: str, value: str | None) -> str:
        if flag(name) not in options:
            return name if value is None else f"{name}={value}"
        return flag(name) if value is None else flag(name) + " " + value.strip("'\"")

    return err.respell(spell)


def main() -> None:
    """Console entry point: bad input prints one line to stderr and exits 2."""
    _register()
    try:
        app(standalone_mode=False)
    except WorkbenchError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except SAEError as err:
        print(f"error: {flag_message(err, sys.argv[1:])}", file=sys.stderr)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except CLICK_ERROR as err:  # an unknown flag, a missing option: click's usage message
        err.show()
        sys.exit(2)


if __name__ == "__main__":
    main()
