#!/bin/sh
# SPDX-License-Identifier: MIT
#
# install.sh: install (or remove) azure-provisioning, on this machine or into a
# mounted image tree (--root DIR). POSIX sh; run with --help for the options.
#
# What it installs (paths inside the target):
#   /usr/local/lib/azure-provisioning/azure_provisioning.py 0644, byte-compiled
#                                                               with the image's Python
#   /usr/local/sbin/azure-provisioning                     0755 (a launcher of it)
#   /etc/systemd/system/azure-provisioning.service         0644 (interpreter written in)
#   /etc/systemd/system/multi-user.target.wants/azure-provisioning.service (symlink)
#   /usr/local/share/doc/azure-provisioning/README.md, LICENSE, install-manifest  0644
# Every file is written to a temporary file in its target directory, given its
# mode, then renamed over the old one, so a re-run upgrades in place and an
# interrupted run never leaves a half-written file behind.

set -eu
umask 022

PROG=install.sh
UNIT=azure-provisioning.service
SCRIPT_PATH=/usr/local/sbin/azure-provisioning
# The module lives beside its bytecode, compiled here once instead of at every
# boot (compiling the whole file is most of the start-up time).
MODULE_DIR=/usr/local/lib/azure-provisioning
MODULE_PATH=$MODULE_DIR/azure_provisioning.py
UNIT_DIR=/etc/systemd/system
UNIT_PATH=$UNIT_DIR/$UNIT
WANTS_DIR=$UNIT_DIR/multi-user.target.wants
DOC_DIR=/usr/local/share/doc/azure-provisioning
# Lists the directories install.sh created, so that --uninstall removes them
# again (when empty) and leaves the tree as it found it.
MANIFEST=$DOC_DIR/install-manifest
DEFAULT_PYTHONS="/usr/bin/python3 /usr/libexec/platform-python"

# ---------------------------------------------------------------- messages

say() {
    printf '%s: %s\n' "$PROG" "$*"
}

warn() {
    printf '%s: warning: %s\n' "$PROG" "$*" >&2
}

die() {
    printf '%s: error: %s\n' "$PROG" "$*" >&2
    exit 1
}

usage_error() {
    printf '%s: error: %s (see %s --help)\n' "$PROG" "$*" "$PROG" >&2
    exit 2
}

usage() {
    cat <<EOF
$PROG - install azure-provisioning, the first-boot Azure provisioner

Installs the provisioner and its systemd unit, and enables the unit: the
next boot sets the hostname and reports the VM Ready to Azure, once (the unit
disables itself after a successful run; a failed run is tried again at the
following boot).

USAGE:
    sh $PROG [OPTIONS]

OPTIONS:
    --root DIR       Install into the image tree mounted at DIR instead of this
                     machine (no running systemd needed; root not required if
                     DIR is writable)
    --python PATH    Interpreter written into the unit's ExecStart=, a path
                     inside the target (default: the first of
                     /usr/bin/python3 and /usr/libexec/platform-python that
                     exists). Must be Python >= 3.6 with the full standard
                     library (the python3-minimal package lacks some of it)
    --provision-user Also create the admin user from IMDS with its SSH keys and
                     sudo (adds --provision-user to ExecStart=)
    --uninstall      Disable the unit and remove every file listed below
    -h, --help       Print this help and exit

INSTALLED FILES (inside DIR with --root):
    $MODULE_PATH   (0644, and its
        bytecode in __pycache__, compiled with the target's Python when it can run)
    $SCRIPT_PATH   (0755, a launcher of it)
    $UNIT_PATH   (0644)
    $WANTS_DIR/$UNIT
    $DOC_DIR/   (README.md, LICENSE,
        install-manifest: the directories $PROG created, for --uninstall)

Running it again upgrades in place. Last, it runs the installed
azure-provisioning --check with the target's Python and prints its report
(other agents, network, hostname): it fails when that Python cannot run the
unit, and warns when the image is not yet ready to capture.

EXAMPLES:
    sudo sh $PROG                          install on this machine
    sudo sh $PROG --root /mnt/image        install into a mounted image
    sudo sh $PROG --root /mnt/image --uninstall

EXIT STATUS:
    0 done, 1 failed (the message says why), 2 usage error
EOF
}

# ---------------------------------------------------------------- helpers

# The temporary file being written, if any (removed on any exit).
COPY_TMP=""

cleanup() {
    [ -z "$COPY_TMP" ] || rm -f "$COPY_TMP"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

need_cmd() {
    command -v "$1" >/dev/null 2>&1 ||
        die "needs the '$1' command, which was not found in PATH ($PATH)"
}

# The target as seen from here: $ROOT is "" for this machine.
target() {
    printf '%s%s' "$ROOT" "$1"
}

# $1 quoted for a shell command line that a message suggests, when needed.
shell_quote() {
    case $1 in
        *[!A-Za-z0-9/._+=:,@%-]* | "") printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")" ;;
        *) printf '%s' "$1" ;;
    esac
}

# Where a message should say a path is.
where() {
    if [ -n "$ROOT" ]; then
        printf '%s (in %s)' "$1" "$ROOT"
    else
        printf '%s' "$1"
    fi
}

CREATED_DIRS=""

ensure_dir() {
    # $1: directory inside the target
    [ -d "$(target "$1")" ] && return 0
    [ "$1" = / ] && die "the target's / is not a directory"
    ensure_dir "$(dirname "$1")"
    mkdir "$(target "$1")" || die "cannot create directory $(where "$1")"
    CREATED_DIRS="$CREATED_DIRS $1"
    say "created directory $(where "$1")"
}

# Directories listed in the target's manifest (only plausible ones: under
# /usr/local or /etc/systemd/system, no "..").
manifest_dirs() {
    [ -f "$(target "$MANIFEST")" ] || return 0
    sed -n 's/^dir \(\/.*\)$/\1/p' "$(target "$MANIFEST")" | while IFS= read -r _m; do
        case $_m in
            *..* | *[!A-Za-z0-9/._+-]*) ;;
            /usr/local/?* | /etc/systemd/system/?*) printf '%s\n' "$_m" ;;
        esac
    done
}

# Install file $1 (a path on this machine) as $2 (a path inside the target)
# with mode $3: temporary file in the same directory (same file system, and
# the directory's SELinux label), chmod, then rename over the old file.
# $4: the command that writes the content from $1 to stdout (default cat).
install_file() {
    _src=$1 _dest=$2 _mode=$3 _filter=${4:-cat}
    ensure_dir "$(dirname "$_dest")"
    _d=$(target "$_dest")
    COPY_TMP=$(mktemp "$(dirname "$_d")/.$(basename "$_d").XXXXXX") ||
        die "cannot create a temporary file in $(where "$(dirname "$_dest")")"
    _tmp=$COPY_TMP
    "$_filter" "$_src" >"$_tmp" || die "cannot write $_tmp (from $_src)"
    chmod "$_mode" "$_tmp" || die "cannot chmod $_mode $_tmp"
    if [ -f "$_d" ] && [ ! -L "$_d" ] && command -v cmp >/dev/null 2>&1 &&
        cmp -s "$_tmp" "$_d"; then
        # kept, mode set: its mtime, and so the bytecode compiled from it, stays valid
        rm -f "$_tmp"
        chmod "$_mode" "$_d" || die "cannot chmod $_mode $(where "$_dest")"
        _what="unchanged"
    else
        if [ -e "$_d" ] || [ -L "$_d" ]; then
            _what="updated"
        else
            _what="installed"
        fi
        mv -f "$_tmp" "$_d" || die "cannot rename $_tmp to $_d"
    fi
    COPY_TMP=""
    say "$_what $(where "$_dest") (mode $_mode)"
}

remove_file() {
    # $1: path inside the target
    _p=$(target "$1")
    if [ -e "$_p" ] || [ -L "$_p" ]; then
        rm -f "$_p" || die "cannot remove $(where "$1")"
        say "removed $(where "$1")"
    fi
}

# $1, a path inside the target, with every symbolic link on it resolved as the
# image sees it: an absolute link from the target's /, a relative one from its
# directory, ".." never above the target's / (an image's /usr/bin/python3 ->
# /etc/alternatives/python3 on RHEL, or a /bin -> /usr/bin, must not lead to
# this machine's files). Fails after 40 links, as the kernel does. The one
# place install.sh resolves a path: it runs before the provisioner is
# installed, and where no Python can run here.
resolve_in_target() {
    _done="" _todo=$1 _n=0
    while [ -n "$_todo" ]; do
        _c=${_todo%%/*}
        case $_todo in
            */*) _todo=${_todo#*/} ;;
            *) _todo="" ;;
        esac
        case $_c in
            "" | .) continue ;;
            ..) _done=${_done%/*} && continue ;;
        esac
        if [ -L "$(target "$_done/$_c")" ]; then
            _n=$((_n + 1))
            [ "$_n" -le 40 ] || return 1
            _l=$(readlink "$(target "$_done/$_c")") || return 1
            case $_l in
                /*) _done="" ;;
            esac
            _todo=$_l${_todo:+/$_todo}
        else
            _done=$_done/$_c
        fi
    done
    printf '%s\n' "${_done:-/}"
}

# ---------------------------------------------------------------- python

# Sets PY (the interpreter the unit runs) and RUN_PY (how to run it from here:
# "direct", "chroot", or "" when it cannot be run here). Whether it can run the
# provisioner is for the provisioner's own --check to say, after installing.
choose_python() {
    if [ -n "$PYTHON" ]; then
        # Written into ExecStart=: keep to characters that need no quoting
        # there (and none that sed would read as special).
        case $PYTHON in
            *[!A-Za-z0-9/._+-]*) die "--python '$PYTHON': only letters, digits and / . _ + - are supported in the path" ;;
        esac
        _r=$(resolve_in_target "$PYTHON") || die "$(where "$PYTHON"): too many levels of symbolic links"
        [ -f "$(target "$_r")" ] || die "--python $PYTHON: $(where "$PYTHON") does not exist"
        [ -x "$(target "$_r")" ] || die "--python $PYTHON: $(where "$PYTHON") is not executable"
        PY=$PYTHON
    else
        PY=""
        for _c in $DEFAULT_PYTHONS; do
            _r=$(resolve_in_target "$_c") || continue
            if [ -f "$(target "$_r")" ] && [ -x "$(target "$_r")" ]; then
                PY=$_c
                break
            fi
        done
        [ -n "$PY" ] || die "no Python found: neither $(where /usr/bin/python3) nor $(where /usr/libexec/platform-python) exists; install python3 (the full package, not python3-minimal) or pass --python PATH"
    fi
    # Can it run here as the unit runs it (Python 2 knows no -I)? Else the check
    # judges it by its files.
    if [ -n "$ROOT" ] && [ "$(id -u)" != 0 ]; then
        RUN_PY="" NO_RUN_WHY="not root, so it cannot be run with chroot"
    elif [ -n "$ROOT" ] && ! command -v chroot >/dev/null 2>&1; then
        RUN_PY="" NO_RUN_WHY="no chroot command here"
    else
        RUN_PY=direct
        [ -z "$ROOT" ] || RUN_PY=chroot
        if ! _out=$(target_python -I -S -c 'import sys; sys.exit(sys.version_info < (3, 6))' 2>&1); then
            RUN_PY="" NO_RUN_WHY="it is older than Python 3.6 or does not run here${_out:+: $(printf '%s' "$_out" | tr '\n' ' ' | cut -c1-200)}"
        fi
    fi
}

# Run the target's interpreter with the arguments given.
target_python() {
    if [ "$RUN_PY" = chroot ]; then
        chroot "$ROOT" "$PY" "$@"
    else
        "$PY" "$@"
    fi
}

# ---------------------------------------------------------------- checking

# The last line of $1.
last_line() {
    printf '%s\n' "$1" | tail -n 1
}

# Ask the installed provisioner whether the image is ready (its --check knows the
# interpreter, the modules it needs and the other agents): with the target's own
# interpreter when it runs here, else with this machine's python3, which then
# judges the target's interpreter by its files. Its exit status decides, never
# its wording: 0 ready; 1 not ready (a warning: the FAIL lines say what to fix);
# 3 the unit's Python cannot run it (the install fails; the check's last line,
# "azure-provisioning: error: ...", says why); 4 the check itself failed (an
# internal error: the install fails, its last line quoted), as does any other.
check_target() {
    if [ -n "$RUN_PY" ]; then
        _how="$PY" _run=target_python
        # inside the image (chroot), its fixes must still name the image's place here
        set -- "$SCRIPT_PATH" --check
        [ "$RUN_PY" != chroot ] || set -- "$SCRIPT_PATH" --check --shown-root "$ROOT"
    elif _host=$(command -v python3 2>/dev/null); then
        _how="this machine's $_host, judging $PY by its files ($NO_RUN_WHY)" _run=$_host
        set -- "$ROOT$MODULE_PATH" --check --root "${ROOT:-/}"
    else
        warn "not checked: $PY cannot be run here ($NO_RUN_WHY) and this machine has no python3; run 'azure-provisioning --check' in the image"
        return 0
    fi
    # whether it starts at all (a Python lacking a module it imports first stops it)
    if _out=$("$_run" -I -S "$1" --version 2>&1); then _rc=0; else _rc=$?; fi
    [ "$_rc" -eq 0 ] ||
        die "installed, but $(where "$PY") cannot run it (exit status $_rc): $(last_line "$_out" | cut -c1-300); azure-provisioning needs Python 3.6 or newer with the full standard library: fix that or pass --python PATH, then run $PROG again (or --uninstall)"
    if _out=$("$_run" -I -S "$@" 2>&1); then _rc=0; else _rc=$?; fi
    _last=$(last_line "$_out")
    # unless ready or not ready, the last line is the error's, said once: in ours below
    [ "$_rc" -le 1 ] || _out=$(printf '%s\n' "$_out" | sed '$d')
    say "checked the image with $_how (azure-provisioning --check):"
    printf '%s\n' "$_out" | sed "s/^/$PROG: check: /"
    case $_rc in
        0) ;;
        1) warn "installed, but the image is not ready to capture: fix the FAIL lines above" ;;
        3) die "installed, but ${_last#"azure-provisioning: error: "}; then run $PROG again (or --uninstall)" ;;
        *) die "installed, but azure-provisioning --check failed (exit status $_rc): $(printf '%s' "$_last" | cut -c1-300)" ;;
    esac
}

# ---------------------------------------------------------------- systemd

systemd_running() {
    [ -z "$ROOT" ] && [ -d /run/systemd/system ]
}

# Run systemctl, showing its output only when it fails.
run_systemctl() {
    if _out=$(systemctl "$@" 2>&1); then
        return 0
    fi
    die "systemctl $* failed: $(printf '%s' "$_out" | tr '\n' ' ')"
}

enable_unit() {
    _link=$WANTS_DIR/$UNIT
    if command -v systemctl >/dev/null 2>&1; then
        if [ -n "$ROOT" ]; then
            run_systemctl --root="$ROOT" enable "$UNIT"
            _how="systemctl --root=$ROOT enable"
        else
            if systemd_running; then
                run_systemctl daemon-reload
                say "reloaded systemd (systemctl daemon-reload)"
            fi
            run_systemctl enable "$UNIT"
            _how="systemctl enable"
        fi
        [ -L "$(target "$_link")" ] ||
            die "$_how $UNIT succeeded but $(where "$_link") is missing"
    else
        # What systemctl enable does: an absolute link to the unit's path
        # inside the target.
        ensure_dir "$WANTS_DIR"
        _t=$(target "$_link")
        if [ -L "$_t" ] && [ "$(readlink "$_t")" = "$UNIT_PATH" ]; then
            :
        else
            rm -f "$_t" || die "cannot remove $(where "$_link")"
            ln -s "$UNIT_PATH" "$_t" || die "cannot create the symlink $(where "$_link")"
        fi
        _how="symlink made by $PROG: no systemctl here"
    fi
    say "enabled $UNIT: $_link -> $(readlink "$(target "$_link")") ($_how)"
}

disable_unit() {
    if [ -f "$(target "$UNIT_PATH")" ] && command -v systemctl >/dev/null 2>&1; then
        if [ -n "$ROOT" ]; then
            run_systemctl --root="$ROOT" disable "$UNIT"
            say "disabled $UNIT (systemctl --root=$ROOT disable)"
        else
            run_systemctl disable "$UNIT"
            say "disabled $UNIT (systemctl disable)"
        fi
    fi
    # Whatever systemctl did not find (or when there is no systemctl): every
    # link to our unit in a .wants/.requires directory.
    for _w in "$(target "$UNIT_DIR")"/*.wants/"$UNIT" "$(target "$UNIT_DIR")"/*.requires/"$UNIT"; do
        if [ -L "$_w" ] || [ -e "$_w" ]; then
            rm -f "$_w" || die "cannot remove $_w"
            say "removed $(where "${_w#"$ROOT"}")"
            # systemctl disable also drops the .wants directory it emptied.
            rmdir "$(dirname "$_w")" 2>/dev/null || true
        fi
    done
}

# ---------------------------------------------------------------- main

do_install() {
    _src=$SRC_DIR/azure_provisioning.py
    [ -f "$_src" ] || die "azure_provisioning.py not found next to $PROG (looked in $SRC_DIR): run $PROG from the azure-provisioning source tree"
    [ -f "$SRC_DIR/$UNIT" ] || die "$UNIT not found next to $PROG (looked in $SRC_DIR)"
    grep -q '^ExecStart=/usr/bin/python3 -I -S /usr/local/sbin/azure-provisioning$' "$SRC_DIR/$UNIT" ||
        die "$SRC_DIR/$UNIT has no 'ExecStart=/usr/bin/python3 -I -S /usr/local/sbin/azure-provisioning' line to write the interpreter into"

    choose_python

    # systemctl for ExecStartPost=: where the target has it (/bin/systemctl
    # on Debian 10 without merged /usr, both on merged systems).
    if [ -x "$(target /bin/systemctl)" ] || [ -L "$(target /bin/systemctl)" ]; then
        _systemctl=/bin/systemctl
    elif [ -x "$(target /usr/bin/systemctl)" ] || [ -L "$(target /usr/bin/systemctl)" ]; then
        _systemctl=/usr/bin/systemctl
    else
        _systemctl=/bin/systemctl
        warn "no systemctl in $(where /bin) or $(where /usr/bin): is systemd installed in the target? The unit needs it (its ExecStartPost= runs $_systemctl)"
    fi

    SYSTEMCTL_PATH=$_systemctl

    install_file "$_src" "$MODULE_PATH" 0644
    compile_module
    install_file /dev/null "$SCRIPT_PATH" 0755 launcher_text
    install_file "$SRC_DIR/$UNIT" "$UNIT_PATH" 0644 unit_text
    say "unit runs: ExecStart=$PY -I -S $SCRIPT_PATH$SCRIPT_ARGS"
    for _doc in README.md LICENSE; do
        if [ -f "$SRC_DIR/$_doc" ]; then
            install_file "$SRC_DIR/$_doc" "$DOC_DIR/$_doc" 0644
        else
            say "skipped $DOC_DIR/$_doc: no $_doc next to $PROG"
        fi
    done
    enable_unit
    install_file /dev/null "$MANIFEST" 0644 manifest_text
    check_target
    if [ -n "$ROOT" ]; then
        say "done: the image at $ROOT provisions itself on its next first boot"
    else
        say "done: $UNIT runs at the next boot (it does not start now)"
    fi
}

# Byte-compile the installed module with the target's own interpreter (through
# chroot with --root), so that no boot compiles it. When that interpreter cannot
# be run here, the module is compiled when it first runs: slower, still correct.
compile_module() {
    if [ -z "$RUN_PY" ]; then
        say "not compiled: $(where "$PY") cannot be run here ($NO_RUN_WHY); $MODULE_PATH is compiled when it first runs"
        return 0
    fi
    # checked-hash bytecode (3.7+): an edit of the module, even one within the same
    # second and of the same size, is seen at the next start; 3.6 has mtime and size
    _compile='import py_compile, sys
mode = getattr(py_compile, "PycInvalidationMode", None)
how = {"invalidation_mode": mode.CHECKED_HASH} if mode else {}
try:
    sys.stdout.write(py_compile.compile(sys.argv[1], doraise=True, **how) + "\n")
except py_compile.PyCompileError as e:
    sys.exit(" ".join(e.msg.split()))'
    _out=$(target_python -I -S -c "$_compile" "$MODULE_PATH" 2>&1) && _rc=0 || _rc=$?
    [ "$_rc" -eq 0 ] ||
        die "byte-compiling $(where "$MODULE_PATH") with $PY failed (exit status $_rc): $(printf '%s' "$_out" | tr '\n' ' ' | cut -c1-300)"
    say "compiled $(where "$MODULE_PATH") with $PY: $(where "$(printf '%s\n' "$_out" | tail -n 1)")"
}

# The launcher ($1 is unused): the target's interpreter, the module's directory.
launcher_text() {
    cat <<EOF
#!$PY -IS
# azure-provisioning launcher, written by $PROG: runs the module installed (and
# byte-compiled) in $MODULE_DIR. The unit runs it as $PY -I -S $SCRIPT_PATH.
import sys
sys.path.insert(0, '$MODULE_DIR')
from azure_provisioning import main
sys.exit(main())
EOF
}

# The unit ($1) with the target's interpreter and systemctl written in.
unit_text() {
    sed -e "s|^ExecStart=/usr/bin/python3 \(.*\)$|ExecStart=$PY \1$SCRIPT_ARGS|" \
        -e "s|^ExecStartPost=/bin/systemctl |ExecStartPost=$SYSTEMCTL_PATH |" "$1"
}

# The manifest: directories created by this run and by earlier ones.
manifest_text() {
    echo "# Written by $PROG: the directories it created. $PROG --uninstall"
    echo "# removes them again when they are empty."
    { manifest_dirs; for _m in $CREATED_DIRS; do printf '%s\n' "$_m"; done; } |
        sort -u | sed 's/^/dir /'
}

do_uninstall() {
    _dirs=$(manifest_dirs)
    disable_unit
    remove_file "$UNIT_PATH"
    remove_file "$SCRIPT_PATH"
    remove_file "$MODULE_PATH"
    for _c in "$(target "$MODULE_DIR")"/__pycache__/azure_provisioning.*.pyc; do
        [ -e "$_c" ] || continue
        rm -f "$_c" || die "cannot remove $_c"
        say "removed $(where "${_c#"$ROOT"}")"
    done
    rmdir "$(target "$MODULE_DIR")/__pycache__" 2>/dev/null || true
    remove_file "$DOC_DIR/README.md"
    remove_file "$DOC_DIR/LICENSE"
    remove_file "$MANIFEST"
    # Deepest first; only when empty.
    _all=$(printf '%s\n%s\n' "$DOC_DIR" "$_dirs" | sed '/^$/d' | sort -u |
        awk '{ print length($0) " " $0 }' | sort -rn | cut -d' ' -f2-)
    for _d in $_all; do
        [ -d "$(target "$_d")" ] || continue
        if rmdir "$(target "$_d")" 2>/dev/null; then
            say "removed directory $(where "$_d")"
        elif [ "$_d" = "$DOC_DIR" ]; then
            warn "left $(where "$DOC_DIR") in place: it holds files $PROG did not install"
        fi
    done
    if systemd_running; then
        run_systemctl daemon-reload
        say "reloaded systemd (systemctl daemon-reload)"
    fi
    say "done: azure-provisioning removed$( [ -n "$ROOT" ] && printf ' from %s' "$ROOT")"
}

main() {
    ROOT="" PYTHON="" ACTION=install SCRIPT_ARGS="" _root_given=no _python_given=no
    while [ $# -gt 0 ]; do
        case $1 in
            -h | --help)
                usage
                exit 0
                ;;
            --root)
                [ $# -ge 2 ] || usage_error "--root needs a directory"
                ROOT=$2 _root_given=yes
                shift 2
                ;;
            --root=*)
                ROOT=${1#--root=} _root_given=yes
                shift
                ;;
            --python)
                [ $# -ge 2 ] || usage_error "--python needs a path"
                PYTHON=$2 _python_given=yes
                shift 2
                ;;
            --python=*)
                PYTHON=${1#--python=} _python_given=yes
                shift
                ;;
            --uninstall)
                ACTION=uninstall
                shift
                ;;
            --provision-user)
                SCRIPT_ARGS=" --provision-user"
                shift
                ;;
            *)
                usage_error "unknown option '$1'"
                ;;
        esac
    done
    if [ "$_root_given" = yes ] && [ -z "$ROOT" ]; then
        usage_error "--root needs a directory"
    fi
    if [ "$_python_given" = yes ] && [ -z "$PYTHON" ]; then
        usage_error "--python needs a path"
    fi
    if [ "$ACTION" = uninstall ] && [ "$_python_given" = yes ]; then
        usage_error "--python makes no sense with --uninstall"
    fi
    if [ "$ACTION" = uninstall ] && [ -n "$SCRIPT_ARGS" ]; then
        usage_error "--provision-user makes no sense with --uninstall"
    fi
    case $PYTHON in
        "" | /*) ;;
        *) usage_error "--python needs an absolute path, got '$PYTHON'" ;;
    esac

    for _c in awk cat chmod cut dirname basename grep id mkdir mktemp mv readlink rm rmdir sed sort tr ln; do
        need_cmd "$_c"
    done

    if [ -n "$ROOT" ]; then
        [ -d "$ROOT" ] || die "--root $ROOT: no such directory"
        case $ROOT in
            /*) ;;
            *) ROOT=./$ROOT ;;
        esac
        ROOT=$(cd "$ROOT" && pwd -P) || die "--root: cannot enter $ROOT"
        [ "$ROOT" = / ] && ROOT=""
    fi
    if [ -z "$ROOT" ] && [ "$(id -u)" != 0 ]; then
        die "must be run as root to change this machine (it writes $SCRIPT_PATH and $UNIT_DIR); use sudo, or --root DIR for an image tree you can write"
    fi
    if [ -n "$ROOT" ]; then
        say "target: the image tree at $ROOT"
    fi

    SRC_DIR=$(cd "$(dirname "$0")" && pwd -P) || die "cannot find the directory $PROG is in"

    if [ "$ACTION" = install ]; then
        do_install
    else
        do_uninstall
    fi
}

main "$@"
