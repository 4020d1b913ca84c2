#!/usr/bin/env python3
"""Extracts the JSON shape of the tailcfg wire structs from a tailscale/tailscale
checkout (git object store) into a small JSON schema the interop test reads.

Usage: gen_tailcfg_schema.py <git-dir> <ref> > tailcfg_schema_<ref>.json

Output: {"structs": {"Node": {"ID": "NodeID", ...}, ...},
         "named":   {"NodeID": "int64", ...}}
Only field names and Go type expressions are kept (the wire protocol), never
comments or code. The JSON name is the `json:"name"` tag when it has one,
else the Go field name; fields tagged "-" and unexported fields are dropped."""
import json, re, subprocess, sys

FILES = ["tailcfg/tailcfg.go", "tailcfg/derpmap.go", "types/dnstype/dnstype.go",
         "tailcfg/proto_port_range.go"]

def show(gitdir, ref, path):
    try:
        return subprocess.run(["git", "-C", gitdir, "show", f"{ref}:{path}"], check=True,
                              capture_output=True, text=True).stdout
    except subprocess.CalledProcessError:
        return ""

def main():
    gitdir, ref = sys.argv[1], sys.argv[2]
    structs, named = {}, {}
    for f in FILES:
        src = show(gitdir, ref, f)
        pkg = "dnstype." if f.startswith("types/dnstype") else ""
        for m in re.finditer(r"^type (\w+) struct \{\n(.*?)^\}", src, re.S | re.M):
            name, body = m.group(1), m.group(2)
            fields = {}
            for line in body.split("\n"):
                line = line.split("//")[0].rstrip()
                fm = re.match(r"^\t(\w+)\s+([^`]+?)\s*(`.*`)?$", line)
                if not fm or not fm.group(1)[0].isupper():
                    continue
                fname, ftype, tag = fm.group(1), fm.group(2).strip(), fm.group(3) or ""
                jm = re.search(r'json:"([^"]*)"', tag)
                jname = fname
                if jm:
                    first = jm.group(1).split(",")[0]
                    if first == "-":
                        continue
                    if first:
                        jname = first
                if pkg and not ftype.startswith(("[]", "*", "map[")) and ftype[0].isupper():
                    ftype = pkg + ftype
                fields[jname] = ftype
            structs[pkg + name] = fields
        for m in re.finditer(r"^type (\w+) (?:= )?([\w.\[\]*]+)\s*$", src, re.M):
            if m.group(2) not in ("struct", "interface"):
                named[pkg + m.group(1)] = m.group(2)
    json.dump({"ref": ref, "structs": structs, "named": named}, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")

main()
