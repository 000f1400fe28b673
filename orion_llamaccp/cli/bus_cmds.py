"""Placeholder until this group lands."""

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """No subcommands yet."""
