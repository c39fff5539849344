"""The ``mv3d`` command: a Click group whose subcommands are the stages found through the
``mv3d.stages`` entry points, plus the built-ins ``init``, ``status``, ``summary``, ``stages`` and ``plugins``.

Nothing heavy is imported here: ``mv3d --help`` loads only the thin stage modules.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass

import click

from .config import default_map
from .errors import Mv3dError, PluginError
from .log import setup_console
from .project import Project, stage_status
from .registry import get_registry
from .runs import wrap_stage
from .version import __version__

BUILTINS = ("init", "status", "summary", "stages", "plugins")
TRUTHY = {"1", "true", "yes", "on"}


@dataclass
class RootState:
    project: str
    debug: bool
    verbosity: int


class StageGroup(click.Group):
    """Root group: built-in commands plus lazily discovered stages."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(self.commands) + sorted(get_registry().stages)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.commands:
            return self.commands[name]
        registry = get_registry()
        stage = registry.stages.get(name)
        return None if stage is None else wrap_stage(stage, registry)

    def resolve_command(self, ctx: click.Context, args: list[str]):
        name = args[0] if args else None
        if name and not name.startswith("-") and self.get_command(ctx, name) is None:
            for info in get_registry().plugins.values():
                for err in info.errors:
                    if err.startswith(f"stage {name!r}"):
                        raise PluginError(f"{err} (plugin {info.distribution}); fix or reinstall that plugin "
                                          f"(pip install --force-reinstall {info.distribution}) or uninstall it; "
                                          "see: mv3d plugins")
            close = difflib.get_close_matches(name, self.list_commands(ctx), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else " See: mv3d --help"
            ctx.fail(f"No such stage or command '{name}'.{hint}")
        return super().resolve_command(ctx, args)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        registry = get_registry()
        width = formatter.width - 6
        rows = [(n, self.commands[n].get_short_help_str(width)) for n in sorted(self.commands)]
        stage_rows = [(n, s.summary) for n, s in sorted(registry.stages.items())]
        if stage_rows:
            with formatter.section("Stages"):
                formatter.write_dl(stage_rows)
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except Mv3dError as e:
            if _debug(ctx):
                raise
            raise click.ClickException(str(e)) from e


def _debug(ctx: click.Context) -> bool:
    state = ctx.obj
    return bool(state.debug) if isinstance(state, RootState) else os.environ.get("MV3D_DEBUG", "").lower() in TRUTHY


@click.group(cls=StageGroup, context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "MV3D"})
@click.option("-P", "--project", default=".", envvar="MV3D_PROJECT", show_default=True,
              help="Project directory (env MV3D_PROJECT).")
@click.option("--debug", is_flag=True, envvar="MV3D_DEBUG", help="Show tracebacks (env MV3D_DEBUG).")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for all).")
@click.option("-q", "--quiet", count=True, help="Less log output.")
@click.version_option(__version__, "--version", prog_name="mv3d", message="%(prog)s %(version)s")
@click.pass_context
def cli(ctx: click.Context, project: str, debug: bool, verbose: int, quiet: int) -> None:
    """mv3d: MedVista3D 3D CT vision-language pretraining as composable stages.

    Stages exchange files through a project directory (-P DIR). Start with:

    \b
      mv3d init proj && mv3d synth data/ && mv3d -P proj status
    """
    ctx.obj = RootState(project=project, debug=debug, verbosity=verbose - quiet)
    setup_console(verbose - quiet)
    if ctx.invoked_subcommand in get_registry().stages:
        p = Project(project)
        if p.exists():  # [stages.<name>] of mv3d.toml -> option defaults
            ctx.default_map = default_map(p.settings())


@cli.command()
@click.argument("directory", default=".", type=click.Path(file_okay=False))
def init(directory: str) -> None:
    """Create a project directory (mv3d.toml, manifest.json, runs/)."""
    existed = Project(directory).exists()
    p = Project.init(directory)
    click.echo(f"{'Project already exists' if existed else 'Initialised project'}: {p.root}")


@cli.command()
@click.option("--json", "json_", is_flag=True, help="Print JSON to stdout.")
@click.pass_obj
def status(state: RootState, json_: bool) -> None:
    """Show every stage of the project: missing, running, done, stale or failed."""
    project = Project(state.project).require()
    manifest = project.manifest()
    rows = []
    for name, stage in sorted(get_registry().stages.items()):
        if not stage.project:
            continue
        rec = manifest["stages"].get(name, {})
        outputs = [manifest["artifacts"][k]["path"] for k in rec.get("outputs", []) if k in manifest["artifacts"]]
        rows.append({"stage": name, "status": stage_status(project, name, manifest),
                     "last_run": rec.get("last_run"), "outputs": outputs})
    if json_:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(_table(["stage", "status", "last run", "outputs"],
                      [[r["stage"], r["status"], r["last_run"] or "-", ", ".join(r["outputs"]) or "-"] for r in rows]))


@cli.command()
@click.option("--json", "json_", is_flag=True, help="Print JSON to stdout.")
@click.pass_obj
def summary(state: RootState, json_: bool) -> None:
    """Headline numbers of the latest zeroshot and retrieve runs, beside random baselines."""
    from .summary import format_summary, summarize, to_json

    result = summarize(state.project)
    click.echo(json.dumps(to_json(result), indent=2) if json_ else format_summary(result))


@cli.command()
@click.option("--json", "json_", is_flag=True, help="Print JSON to stdout.")
def stages(json_: bool) -> None:
    """List the installed stages, where they come from, and what they read and write."""
    rows = [{"stage": s.name, "distribution": s.distribution, "summary": s.summary, "inputs": list(s.inputs),
             "outputs": list(s.output_keys)} for s in sorted(get_registry().stages.values(), key=lambda s: s.name)]
    if json_:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(_table(["stage", "from", "inputs", "outputs", "summary"],
                      [[r["stage"], r["distribution"], ", ".join(r["inputs"]) or "-",
                        ", ".join(r["outputs"]) or "-", r["summary"]] for r in rows]))


@cli.command()
@click.option("--all", "all_", is_flag=True, help="Include mv3d's own core stages.")
def plugins(all_: bool) -> None:
    """Installed plugin distributions as JSON: version, stages, load errors."""
    from .registry import CORE_DISTRIBUTION, normalize_dist

    infos = [i.as_dict() for d, i in sorted(get_registry().plugins.items())
             if all_ or normalize_dist(d) != CORE_DISTRIBUTION]
    click.echo(json.dumps(infos, indent=2))


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    return "\n".join(line.rstrip() for line in lines + [fmt.format(*map(str, r)) for r in rows])


def main() -> None:
    cli(prog_name="mv3d")
