"""`inferforge registry ...`: the command line of the model registry (`inferforge.registry`).

Every command takes `--registry DIR` (default `INFERFORGE_REGISTRY`, else the user's data directory).
Bad input (an unknown name, version or alias, a malformed reference, a path that is not an artifact,
a tampered artifact, removing a version an alias points at, an unwritable registry) is one line and
exit 2; `registry verify` exits 1 when a stored copy is missing or damaged, naming it.
"""

from __future__ import annotations

import argparse
import json
import sys

from inferforge.errors import UserInputError

EXIT_OK, EXIT_PROBLEM = 0, 1


def _registry(args):
    from inferforge.registry import Registry

    return Registry(args.registry)


def _split_version(ref: str) -> tuple[str, int]:
    """`NAME@3` -> ("NAME", 3); anything else is refused (alias and remove take a version number)."""
    from inferforge.registry_refs import parse_ref

    name, which = parse_ref(ref)
    if not isinstance(which, int):
        raise UserInputError(f"{ref!r}: give NAME@VERSION with a version number, e.g. {name}@3 "
                             "(`inferforge registry list` shows them)")
    return name, which


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _version_line(v) -> str:
    aliases = f"  aliases: {', '.join(v.aliases)}" if v.aliases else ""
    return (f"{v.ref:<24} content {v.content}  {v.kind or '-':<20} {v.owner:<12} {v.created[:19]}Z{aliases}")


def cmd_add(args) -> int:
    if args.mlflow_uri:
        from inferforge.registry_mlflow import require_mlflow

        require_mlflow()   # before anything is registered
    version = _registry(args).add(args.artifact, args.name, alias=args.alias, owner=args.owner)
    mlflow = None
    if args.mlflow_uri:
        from inferforge.registry_mlflow import register_in_mlflow

        mlflow = register_in_mlflow(version, args.mlflow_uri, alias=args.alias)
    if args.json:
        _print_json({**version.to_dict(), **({"mlflow": mlflow} if mlflow else {})})
        return EXIT_OK
    state = "already registered as" if version.existing else "registered as"
    print(f"{args.artifact}: {state} {version.ref} (content {version.content})"
          + (f", {args.name}@{args.alias} -> {version.version}" if args.alias else ""))
    if mlflow:
        print(f"mlflow: model {mlflow['name']} version {mlflow['version']} (run {mlflow['run_id']})")
    return EXIT_OK


def cmd_list(args) -> int:
    registry = _registry(args)
    if registry.root.exists() and not registry.root.is_dir():
        raise UserInputError(f"registry {registry.root} is a file, not a directory; set INFERFORGE_REGISTRY (or "
                             "--registry) to the registry directory")
    if not registry.root.exists():
        print(f"registry {registry.root} does not exist yet: no models registered (INFERFORGE_REGISTRY or "
              "--registry chooses another)", file=sys.stderr)
    versions = registry.list(args.name)
    if args.json:
        _print_json([v.to_dict() for v in versions])
    elif not versions:
        print(f"registry {_registry(args).root}: no models registered")
    else:
        for v in versions:
            print(_version_line(v))
    return EXIT_OK


def cmd_show(args) -> int:
    shown = _registry(args).show(args.ref, at=args.at)
    if args.json:
        _print_json(shown)
        return EXIT_OK
    manifest = shown["manifest"]
    print(f"{shown['ref']}  content {shown['content']}  kind {shown['kind']}")
    print(f"aliases: {', '.join(shown['aliases']) or '-'}")
    print(f"owner {shown['owner']}, added {shown['created']} from {shown['added_from']}")
    print(f"stored at {shown['path']}")
    if "error" in manifest:
        print(f"manifest: {manifest['error']}")
        return EXIT_OK
    source = manifest.get("source") or {}
    print(f"artifact {manifest.get('name')}, created {manifest.get('created')}, source {source.get('model')}")
    from inferforge.registry_lineage import check_text

    for check in manifest.get("checks") or []:
        print(f"gate {check_text(check)}")
    return EXIT_OK


def cmd_alias(args) -> int:
    name, number = _split_version(args.ref)
    version = _registry(args).alias(name, number, args.alias, owner=args.owner)
    print(f"{name}@{args.alias} -> {version.version} (content {version.content})")
    return EXIT_OK


def cmd_unalias(args) -> int:
    _registry(args).remove_alias(args.name, args.alias, owner=args.owner)
    print(f"{args.name}@{args.alias} deleted")
    return EXIT_OK


def cmd_remove(args) -> int:
    name, number = _split_version(args.ref)
    _registry(args).remove(name, number)
    print(f"{name}@{number} removed")
    return EXIT_OK


def cmd_history(args) -> int:
    events = _registry(args).alias_history(args.name, args.alias)
    if args.json:
        _print_json(events)
        return EXIT_OK
    for e in events:
        moved = (f"{e['from_version'] if e['from_version'] is not None else '-'} -> "
                 f"{e['to_version'] if e['to_version'] is not None else 'deleted'}")
        print(f"{e['at'][:26]}Z  {args.name}@{e['alias']:<12} {moved:<14} by {e['owner']}")
    if not events:
        print(f"{args.name}: no alias was ever set")
    return EXIT_OK


def cmd_lineage(args) -> int:
    from inferforge.registry_lineage import render

    tree = _registry(args).lineage(args.ref)
    if args.json:
        _print_json(tree)
    else:
        print("\n".join(render(tree)))
    return EXIT_OK


def cmd_verify(args) -> int:
    registry = _registry(args)
    problems = registry.verify(args.ref)
    checked = 1 if args.ref else len(registry.list())
    if args.json:
        _print_json({"checked": checked, "problems": problems})
    else:
        for line in problems:
            print(f"CORRUPT {line}", file=sys.stderr)
        print(f"{checked} stored version(s) checked, {len(problems)} with problems")
    return EXIT_PROBLEM if problems else EXIT_OK


def cmd_registry_help(args) -> int:
    raise UserInputError("give a registry command: add, list, show, alias, unalias, remove, history, lineage or "
                         "verify (inferforge registry --help)")


def add_registry_parser(sub, fmt) -> None:
    """Add `inferforge registry COMMAND` to the subparsers `sub` (argparse formatter class `fmt`)."""
    p = sub.add_parser("registry", formatter_class=fmt, help="named, versioned artifacts with aliases and lineage",
                       description="A local model registry: immutable copies of artifacts by content hash, integer "
                                   "versions per name, aliases (staging, prod) whose every move is recorded, lineage "
                                   "back to the source checkpoint. Safe to use from several processes at once. "
                                   "Load a version with inferforge.load('NAME@ALIAS') or inspect NAME@ALIAS.",
                       epilog="examples:\n  inferforge registry add runs/minilm-int8 --name minilm --alias staging\n"
                              "  inferforge registry alias minilm@1 prod\n  inferforge registry show minilm@prod "
                              "--at 2026-11-24T12:00\n  inferforge registry lineage minilm@prod\n"
                              "  inferforge registry verify")
    p.set_defaults(func=cmd_registry_help)
    commands = p.add_subparsers(dest="registry_command", metavar="COMMAND", parser_class=type(p))

    def command(name: str, func, help_text: str, *, json_flag: bool = True):
        c = commands.add_parser(name, formatter_class=fmt, help=help_text, description=help_text)
        c.add_argument("--registry", metavar="DIR", help="registry directory (default: $INFERFORGE_REGISTRY, else "
                                                         "$XDG_DATA_HOME/inferforge/registry)")
        if json_flag:
            c.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")
        c.add_argument("-q", "--quiet", action="store_true", help=argparse.SUPPRESS)
        c.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        c.set_defaults(func=func)
        return c

    c = command("add", cmd_add, "verify an artifact and register a copy of it as the next version of NAME")
    c.add_argument("artifact", help="artifact directory (holds manifest.json)")
    c.add_argument("--name", required=True, help="model name: letters, digits, '.', '_' and '-'")
    c.add_argument("--alias", help="also point NAME@ALIAS at the version (e.g. staging)")
    c.add_argument("--owner", help="who registers it (default: the OS user)")
    c.add_argument("--mlflow-uri", metavar="URI",
                   help="also register it as an MLflow model version with the same alias (needs mlflow)")
    c = command("list", cmd_list, "list registered versions (of NAME)")
    c.add_argument("name", nargs="?", help="only this model's versions")
    c = command("show", cmd_show, "show a version: NAME (latest), NAME@VERSION or NAME@ALIAS")
    c.add_argument("ref", metavar="NAME[@VERSION|@ALIAS]")
    c.add_argument("--at", metavar="TIME", help="resolve the alias as it pointed at this ISO time (UTC unless an "
                                                "offset is given), e.g. 2026-11-24T12:00")
    c = command("alias", cmd_alias, "point NAME@ALIAS at a version (the move is recorded)", json_flag=False)
    c.add_argument("ref", metavar="NAME@VERSION")
    c.add_argument("alias", metavar="ALIAS")
    c.add_argument("--owner", help="who moves it (default: the OS user)")
    c = command("unalias", cmd_unalias, "delete NAME@ALIAS (recorded like a move)", json_flag=False)
    c.add_argument("name", metavar="NAME")
    c.add_argument("alias", metavar="ALIAS")
    c.add_argument("--owner", help="who deletes it (default: the OS user)")
    c = command("remove", cmd_remove, "remove a version (refused while an alias points at it)", json_flag=False)
    c.add_argument("ref", metavar="NAME@VERSION")
    c = command("history", cmd_history, "every move of NAME's aliases (or of one alias): who, when, from, to")
    c.add_argument("name", metavar="NAME")
    c.add_argument("alias", nargs="?", metavar="ALIAS")
    c = command("lineage", cmd_lineage, "the artifacts a version was made from, back to the source checkpoint, "
                                        "with gate results and data hashes")
    c.add_argument("ref", metavar="NAME[@VERSION|@ALIAS]")
    c = command("verify", cmd_verify, "check stored copies against their manifests; exit 1 naming any that is "
                                      "missing or damaged")
    c.add_argument("ref", nargs="?", metavar="NAME[@VERSION|@ALIAS]", help="only this version (default: all)")
