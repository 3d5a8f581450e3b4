"""The `zfan` command: one click group, a subcommand per role."""

from .main import cli


def main() -> None:
    cli(prog_name="zfan")


__all__ = ["cli", "main"]
