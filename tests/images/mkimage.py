#!/usr/bin/env python3
"""Writes a one-layer docker-archive image (what `ctr images import` reads) without a registry.

    mkimage.py --tag NAME:TAG --out IMAGE.tar (--rootfs DIR | --layer LAYER.tar)
               [--user UID] [--entrypoint JSON-LIST] [--env K=V]... [--workdir DIR] [--port N]...

--rootfs tars a directory as the layer (owners, modes and symlinks kept, files owned by root
unless --chown names a path prefix and uid); --layer takes an existing layer tarball as is.
"""
import argparse
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile


def tar_dir(root, out, chown):
    def fix(info):
        info.mtime = 0
        info.uname = info.gname = ""
        path = "/" + info.name.lstrip("./")
        for prefix, uid in chown:
            if path == prefix or path.startswith(prefix.rstrip("/") + "/"):
                info.uid = info.gid = uid
                break
        else:
            info.uid = info.gid = 0
        return info

    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as t:
        for entry in sorted(os.listdir(root)):
            t.add(os.path.join(root, entry), arcname=entry, filter=fix)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tag", required=True)
    p.add_argument("--out", required=True)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--rootfs")
    src.add_argument("--layer")
    p.add_argument("--chown", action="append", default=[], help="PATH=UID")
    p.add_argument("--user", default="")
    p.add_argument("--entrypoint", default="[]")
    p.add_argument("--env", action="append", default=[])
    p.add_argument("--workdir", default="")
    p.add_argument("--port", action="append", default=[])
    a = p.parse_args()

    work = tempfile.mkdtemp(prefix="mkimage-", dir=os.path.dirname(os.path.abspath(a.out)))
    try:
        layer = os.path.join(work, "layer.tar")
        if a.rootfs:
            chown = [(c.split("=")[0], int(c.split("=")[1])) for c in a.chown]
            tar_dir(a.rootfs, layer, chown)
        else:
            shutil.copyfile(a.layer, layer)
        diff_id = sha256(layer)
        cfg = {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"] + a.env,
               "Entrypoint": json.loads(a.entrypoint)}
        if a.user:
            cfg["User"] = a.user
        if a.workdir:
            cfg["WorkingDir"] = a.workdir
        if a.port:
            cfg["ExposedPorts"] = {f"{n}/tcp": {} for n in a.port}
        config = json.dumps({
            "architecture": "amd64", "os": "linux", "created": "1970-01-01T00:00:00Z",
            "config": cfg,
            "rootfs": {"type": "layers", "diff_ids": ["sha256:" + diff_id]},
        }, sort_keys=True).encode()
        config_name = hashlib.sha256(config).hexdigest() + ".json"
        manifest = json.dumps([{"Config": config_name, "RepoTags": [a.tag],
                                "Layers": [diff_id + "/layer.tar"]}]).encode()
        tmp_out = a.out + ".tmp"
        with tarfile.open(tmp_out, "w") as t:
            for name, data in ((config_name, config), ("manifest.json", manifest)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
            t.add(layer, arcname=diff_id + "/layer.tar")
        os.replace(tmp_out, a.out)
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
