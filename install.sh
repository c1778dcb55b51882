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
# The modules azure_provisioning.py needs (its NEEDED_MODULES) that Debian's
# python3-minimal lacks (base64 is in it), as files of the standard library:
# the probe imports them, check_python_files looks for them.
PY_MODULE_FILES="json/__init__.py xml/parsers/expat.py shutil.py"

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
                     library: json, xml.parsers.expat and shutil (the
                     python3-minimal package lacks them)
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

Running it again upgrades in place. It warns when walinuxagent or cloud-init
is installed in the target: they would report to Azure as well.

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

# Follow the symlinks of the last path component inside the target: an
# image's absolute links (/usr/bin/python3 -> /etc/alternatives/python3 on
# RHEL) must not be resolved against this machine's files.
resolve_in_target() {
    _p=$1 _n=0
    while [ -L "$(target "$_p")" ]; do
        _n=$((_n + 1))
        [ "$_n" -le 40 ] || return 1
        _l=$(readlink "$(target "$_p")") || return 1
        case $_l in
            /*) _p=$_l ;;
            *) _p=$(dirname "$_p")/$_l ;;
        esac
    done
    printf '%s\n' "$_p"
}

# ---------------------------------------------------------------- python

# The words of $1 as "a", "a and b", "a, b and c".
and_list() {
    _j="" _last=""
    for _w in $1; do
        [ -z "$_last" ] || _j="${_j:+$_j, }$_last"
        _last=$_w
    done
    printf '%s%s%s' "$_j" "${_j:+ and }" "$_last"
}

# The module names of the files in $1 (json/__init__.py -> json), one a line.
module_names() {
    for _m in $1; do
        printf '%s\n' "$_m"
    done | sed -e 's|/__init__\.py$||' -e 's|\.py$||' -e 's|/|.|g'
}

# Run by the candidate interpreter (with -E -S -B: no environment, no site,
# no .pyc written into the target). Written so that Python 2 can run it too
# and say what it is. Its argument: the modules to import, separated by
# blanks (it prints "missing MODULE: why" for each that fails). Reads
# azure_provisioning.py on stdin and compiles it.
PROBE='import sys
sys.stdout.write("python %d.%d\n" % tuple(sys.version_info[:2]))
sys.stdout.flush()
if sys.version_info < (3, 6):
    sys.exit(4)
missing = 0
for name in sys.argv[1].split():
    try:
        __import__(name)
    except Exception as e:
        sys.stdout.write("missing %s: %s\n" % (name, " ".join(str(e).split())))
        missing += 1
if missing:
    sys.exit(3)
try:
    compile(sys.stdin.buffer.read(), "azure_provisioning.py", "exec")
except SyntaxError as e:
    sys.stdout.write("%s\n" % (e,))
    sys.exit(5)
sys.stdout.write("ok\n")'

# Sets PY_HOW; dies when the interpreter is unusable.
check_python() {
    _py=$1 _src=$SRC_DIR/azure_provisioning.py
    _ran=no _why="" _mods=$(module_names "$PY_MODULE_FILES")
    PY_RUN=""
    if [ -z "$ROOT" ]; then
        if _out=$("$_py" -E -S -B -c "$PROBE" "$_mods" <"$_src" 2>&1); then _rc=0; else _rc=$?; fi
        _ran=yes
        _how="by running it"
    elif [ "$(id -u)" != 0 ]; then
        _why="not root, so it cannot be run with chroot"
    elif ! command -v chroot >/dev/null 2>&1; then
        _why="no chroot command"
    else
        if _out=$(chroot "$ROOT" "$_py" -E -S -B -c "$PROBE" "$_mods" <"$_src" 2>&1); then _rc=0; else _rc=$?; fi
        _ran=yes
        _how="by running it with chroot $ROOT"
    fi
    if [ "$_ran" = yes ]; then
        _first=$(printf '%s\n' "$_out" | sed -n 1p)
        _ver=$(printf '%s\n' "$_first" | sed -n 's/^python \([0-9][0-9]*\.[0-9][0-9]*\)$/\1/p')
        if [ -z "$_ver" ]; then
            _one=$(printf '%s' "$_out" | tr '\n' ' ' | cut -c1-300)
            if [ -z "$ROOT" ]; then
                die "cannot run $_py (exit status $_rc): $_one"
            fi
            _why="running it with chroot failed (exit status $_rc: $_one)"
        else
            _rest=$(printf '%s\n' "$_out" | sed 1d | tr '\n' ' ' | sed 's/ *$//')
            case $_rc in
                0) ;;
                4) die "$(where "$_py") is Python $_ver; azure-provisioning needs Python 3.6 or newer (pass --python PATH)" ;;
                3)
                    _names=$(and_list "$(printf '%s\n' "$_out" | sed -n 's/^missing \([^ :]*\): .*$/\1/p')")
                    _whys=$(printf '%s\n' "$_out" | sed -n 's/^missing //p' | sed '$!s/$/;/' | tr '\n' ' ' | sed 's/ *$//')
                    [ -n "$_names" ] || die "checking $(where "$_py") failed (exit status 3): $_rest"
                    die "$(where "$_py") (Python $_ver) has no $_names ($_whys): install the full python3 package, not python3-minimal, or pass --python PATH"
                    ;;
                5) die "azure_provisioning.py does not compile with $(where "$_py") (Python $_ver): $_rest" ;;
                *) die "checking $(where "$_py") failed (exit status $_rc): $_out" ;;
            esac
            PY_HOW="Python $_ver with $(and_list "$_mods"), azure_provisioning.py compiles (checked $_how)"
            PY_RUN=$_how
            return 0
        fi
    fi
    check_python_files "$_py" "$_why"
}

# With --root when the interpreter cannot be run: judge by the files.
check_python_files() {
    _py=$1 _why=$2
    _real=$(resolve_in_target "$_py") || die "$(where "$_py"): too many levels of symbolic links"
    _name=$(basename "$_real")
    _prefix=$(dirname "$(dirname "$_real")")
    [ "$_prefix" = / ] && _prefix=""
    _ver=$(printf '%s\n' "$_name" | sed -n 's/^.*python\([0-9][0-9]*\.[0-9][0-9]*\)[a-z]*$/\1/p')
    _libs=""
    if [ -n "$_ver" ]; then
        _from="from the file name $_real"
        for _l in "$_prefix/lib/python$_ver" "$_prefix/lib64/python$_ver"; do
            [ -d "$(target "$_l")" ] && _libs="$_libs $_l"
        done
        [ -n "$_libs" ] || die "$(where "$_real"): no standard library at $_prefix/lib/python$_ver or $_prefix/lib64/python$_ver (checked the files because $_why)"
    else
        # Not named pythonX.Y: accept it only if one standard library is there.
        _count=0
        for _l in "$(target "$_prefix")"/lib/python[0-9]*.[0-9]* "$(target "$_prefix")"/lib64/python[0-9]*.[0-9]*; do
            [ -f "$_l/os.py" ] || continue
            _count=$((_count + 1))
            _libs=${_l#"$ROOT"}
        done
        [ "$_count" -eq 1 ] ||
            die "cannot tell which Python $(where "$_real") is: it is not named pythonX.Y and $_count standard libraries were found under $(where "$_prefix/lib*") (checked the files because $_why); pass --python with the versioned name, e.g. /usr/bin/python3.11"
        _ver=$(printf '%s\n' "$_libs" | sed -n 's/^.*python\([0-9][0-9]*\.[0-9][0-9]*\)$/\1/p')
        _from="from its standard library $_libs"
    fi
    _major=${_ver%%.*} _minor=${_ver#*.}
    if [ "$_major" -lt 3 ] || { [ "$_major" -eq 3 ] && [ "$_minor" -lt 6 ]; }; then
        die "$(where "$_py") is Python $_ver ($_from); azure-provisioning needs Python 3.6 or newer (pass --python PATH)"
    fi
    # Each module as a .py file, a .pyc beside it (a sourceless install) or in
    # __pycache__; the globs expand inside the target, not on this machine.
    _have="" _dirs="" _missing="" _absent=""
    for _m in $PY_MODULE_FILES; do
        _name=$(module_names "$_m")
        _stem=${_m%.py}
        case $_m in
            */*) _pyc=${_stem%/*}/__pycache__/${_stem##*/} ;;
            *) _pyc=__pycache__/$_stem ;;
        esac
        _hit=""
        for _l in $_libs; do
            for _f in "$(target "$_l")/$_m" "$(target "$_l")/${_m}c" "$(target "$_l")/$_pyc".*.pyc; do
                if [ -f "$_f" ]; then
                    _hit=$_l
                    break 2
                fi
            done
        done
        if [ -n "$_hit" ]; then
            _have="$_have $_name"
            case " $_dirs " in *" $_hit "*) ;; *) _dirs="$_dirs $_hit" ;; esac
        else
            _missing="$_missing $_name"
            for _l in $_libs; do
                _absent="${_absent:+$_absent, }$_l/$_m"
            done
        fi
    done
    [ -z "$_missing" ] ||
        die "$(where "$_py") (Python $_ver) has no $(and_list "$_missing"): no $_absent in $ROOT; install the full python3 package, not python3-minimal, or pass --python PATH (checked the files because $_why)"
    [ -x "$(target "$_real")" ] || die "$(where "$_real") is not executable"
    PY_HOW="Python $_ver ($_from), $(and_list "$_have") present in $(and_list "$_dirs") (checked the files because $_why; azure_provisioning.py not compiled with it)"
}

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
    check_python "$PY"
    say "python: $PY: $PY_HOW"
}

# ---------------------------------------------------------------- other agents

# Print the loud warning when walinuxagent or cloud-init would run too.
check_other_agents() {
    if [ -n "$ROOT" ]; then
        _chroot="chroot $(shell_quote "$ROOT") "
        _sysctl="systemctl --root=$(shell_quote "$ROOT")"
    else
        _chroot=""
        _sysctl="systemctl"
    fi
    if [ -x "$(target /usr/bin/apt-get)" ]; then
        _pm=apt
    elif [ -x "$(target /usr/bin/dnf)" ]; then
        _pm=dnf
    elif [ -x "$(target /usr/bin/yum)" ]; then
        _pm=yum
    else
        _pm=""
    fi
    _lines=""
    for _agent in walinuxagent cloud-init; do
        if [ "$_agent" = walinuxagent ]; then
            _bins="/usr/sbin/waagent /usr/bin/waagent"
            _units="walinuxagent.service waagent.service"
            _apt=walinuxagent _rpm=WALinuxAgent
        else
            _bins="/usr/bin/cloud-init /usr/local/bin/cloud-init"
            _units="cloud-init-local.service cloud-init.service cloud-init-main.service cloud-init-network.service cloud-config.service cloud-final.service cloud-init.target"
            _apt=cloud-init _rpm=cloud-init
        fi
        _seen="" _enabled=""
        for _b in $_bins; do
            [ -e "$(target "$_b")" ] && _seen="$_seen $_b"
        done
        for _u in $_units; do
            for _d in /etc/systemd/system /usr/lib/systemd/system /lib/systemd/system; do
                if [ -f "$(target "$_d/$_u")" ]; then
                    _seen="$_seen $_d/$_u"
                    break
                fi
            done
            for _w in "$(target /etc/systemd/system)"/*.wants/"$_u"; do
                if [ -L "$_w" ] || [ -e "$_w" ]; then
                    case " $_enabled " in *" $_u "*) ;; *) _enabled="$_enabled $_u" ;; esac
                fi
            done
        done
        [ -n "$_seen$_enabled" ] || continue
        if [ "$_agent" = cloud-init ] && [ -e "$(target /etc/cloud/cloud-init.disabled)" ]; then
            say "note: cloud-init is installed but $(where /etc/cloud/cloud-init.disabled) keeps it from running"
            continue
        fi
        _lines="$_lines
$_agent is installed in the target:${_seen:- (units only)}
${_enabled:+  and enabled:$_enabled
}It also answers Azure (reports Ready, sets the hostname, may rewrite
network and SSH settings): two agents racing at first boot is not supported.
Remove it before you capture the image:"
        for _u in $_enabled; do
            _lines="$_lines
    $_sysctl disable $_u"
        done
        case $_pm in
            apt) _lines="$_lines
    ${_chroot}apt-get purge -y $_apt" ;;
            dnf | yum) _lines="$_lines
    ${_chroot}$_pm remove -y $_rpm" ;;
            *) _lines="$_lines
    (remove the package that owns it: ${_chroot}rpm -qf PATH or ${_chroot}dpkg -S PATH tells which)" ;;
        esac
        _lines="$_lines
"
    done
    [ -n "$_lines" ] || return 0
    {
        echo "$PROG: WARNING: ********************************************************************"
        printf '%s\n' "$_lines" | sed '1d' | while IFS= read -r _l; do
            printf '%s: WARNING: %s\n' "$PROG" "$_l"
        done
        echo "$PROG: WARNING: ********************************************************************"
    } >&2
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
    check_other_agents

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
    if [ -z "$PY_RUN" ]; then
        say "not compiled: $(where "$PY") cannot be run here; $MODULE_PATH is compiled when it first runs"
        return 0
    fi
    # checked-hash bytecode (3.7+): an edit of the module, even one within the same
    # second and of the same size, is seen at the next start; 3.6 has mtime and size
    _compile='import py_compile, sys
mode = getattr(py_compile, "PycInvalidationMode", None)
how = {"invalidation_mode": mode.CHECKED_HASH} if mode else {}
sys.stdout.write(py_compile.compile(sys.argv[1], doraise=True, **how) + "\n")'
    if [ -z "$ROOT" ]; then
        _out=$("$PY" -I -S -c "$_compile" "$MODULE_PATH" 2>&1) && _rc=0 || _rc=$?
    else
        _out=$(chroot "$ROOT" "$PY" -I -S -c "$_compile" "$MODULE_PATH" 2>&1) && _rc=0 || _rc=$?
    fi
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
