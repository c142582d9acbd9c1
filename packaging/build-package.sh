#!/usr/bin/env bash
# `make package`: the sdist and the wheel, then the .deb, into OUTDIR (default dist/).
#
#   bash packaging/build-package.sh [OUTDIR]
#
# The sdist and wheel come from `python -m build` (in its own venv under
# build/package-tools, not the project's .venv): it builds the wheel from the
# unpacked sdist, so a file missing from the sdist fails the build here.
# The .deb ships the project wheel and its dependency wheels for each Python
# of DSAGENT_DEB_PYTHONS (default "3.11 3.12 3.13": Debian 12, Ubuntu 24.04,
# Debian 13); its postinst builds /opt/dsagent/venv from them offline.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
out=$(realpath -m "${1:-$here/dist}")
py=${PY:-python3}
pythons=${DSAGENT_DEB_PYTHONS:-3.11 3.12 3.13}
tools=$here/build/package-tools

die() { echo "build-package: $*" >&2; exit 1; }
command -v dpkg-deb >/dev/null || die "dpkg-deb not found: the .deb is built on Debian/Ubuntu"

if ! "$tools/bin/python" -m build --version >/dev/null 2>&1; then
  rm -rf "$tools"
  "$py" -m venv "$tools"
  "$tools/bin/python" -m pip install -q 'build>=1.0'
fi

version=$(cd "$here" && "$py" -c \
  'import configparser; c = configparser.ConfigParser(); c.read("setup.cfg"); print(c["metadata"]["version"])')
mkdir -p "$out"
rm -f "$out/dsagent-$version.tar.gz" "$out/dsagent-$version-py3-none-any.whl"
"$tools/bin/python" -m build -q --outdir "$out" "$here" >/dev/null
wheel=$out/dsagent-$version-py3-none-any.whl
[ -f "$wheel" ] || die "python -m build made no $wheel"

arch=$(dpkg --print-architecture)
case "$arch" in
  amd64) plat=x86_64 ;;
  arm64) plat=aarch64 ;;
  *) die "no manylinux wheels for Debian architecture $arch" ;;
esac

stage=$(mktemp -d)
chmod 0755 "$stage"  # becomes / on the target
trap 'rm -rf "$stage"' EXIT
wheels=$stage/opt/dsagent/wheels
mkdir -p "$wheels"
cp "$wheel" "$wheels/"
for v in $pythons; do
  # Binary wheels for that CPython on glibc Linux of this architecture.
  "$tools/bin/python" -m pip download -q --dest "$wheels" --only-binary=:all: \
    --implementation cp --python-version "$v" --abi "cp${v/./}" --abi abi3 --abi none \
    --platform "manylinux_2_28_$plat" --platform "manylinux_2_17_$plat" \
    --platform "manylinux2014_$plat" "$wheel" \
    || die "cannot get the dependency wheels for Python $v"
done

install -D -m 0644 -t "$stage/lib/systemd/system" \
  "$here/packaging/systemd/dsagent.service" "$here/packaging/systemd/dsagent-server.service"
# 0600: a copy made with cp keeps it, as SECURITY.md asks of a config with secrets.
install -D -m 0600 "$here/packaging/agent.toml.example" "$stage/etc/dsagent/agent.toml.example"
install -D -m 0644 -t "$stage/usr/share/doc/dsagent" \
  "$here/docs/install.md" "$here/README.md" "$here/SECURITY.md" "$here/packaging/debian/copyright"
mkdir -p "$stage/usr/bin"
ln -s /opt/dsagent/venv/bin/dsagent "$stage/usr/bin/dsagent"
ln -s /opt/dsagent/venv/bin/dsagent-server "$stage/usr/bin/dsagent-server"

set -- $pythons
py_min=$1
py_max=${!#}
py_next=${py_max%.*}.$(( ${py_max#*.} + 1 ))
mkdir -p "$stage/DEBIAN"
# Installed-Size counts the venv postinst builds (about the wheels' size unpacked: x3).
size=$(( $(du -sk "$stage" | cut -f1) * 3 ))
sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@PY_MIN@/$py_min/" \
    -e "s/@PY_NEXT@/$py_next/" -e "s/@SIZE@/$size/" \
    "$here/packaging/debian/control.in" > "$stage/DEBIAN/control"
install -m 0644 "$here/packaging/debian/conffiles" "$stage/DEBIAN/conffiles"
for script in postinst prerm postrm; do
  sed -e "s/@VERSION@/$version/" -e "s/@PYTHONS@/$pythons/" \
      "$here/packaging/debian/$script" > "$stage/DEBIAN/$script"
  chmod 0755 "$stage/DEBIAN/$script"
done

deb=$out/dsagent_${version}_$arch.deb
dpkg-deb --root-owner-group --build "$stage" "$deb" >/dev/null
echo "$out/dsagent-$version.tar.gz"
echo "$wheel"
echo "$deb"
