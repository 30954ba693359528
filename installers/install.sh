#!/bin/sh
# install.sh: install, upgrade or remove the bridge agent (bridge-daemon) on a Linux machine.
#
# POSIX sh (dash, bash, busybox ash). Everything it downloads is checked before anything is
# installed; a re-run with the same settings changes nothing; see installers/README.md.
set -eu
umask 022

PROG=install.sh
SERVICE=bridge-daemon.service

usage() {
    cat <<'EOF'
Usage: sh install.sh --url https://PLATFORM:PORT (--server-pin HEX... | --ca-file FILE)
                     [--token-stdin | --token-file FILE | --token TOKEN] [options]
       sh install.sh --uninstall [--purge] [--prefix DIR] [--root DIR] [--dry-run]

Installs the bridge agent from its platform: downloads bridge-daemon for this machine's OS and
architecture, checks it against the SHA-256 published beside it (with --release-key: against
the signed release manifest instead) before anything is installed, then installs atomically
the release (PREFIX/lib/bridge/releases/VERSION/bridge-daemon, the launcher
PREFIX/lib/bridge/bridge-launcher, the link "current" to the release and PREFIX/bin/bridge-daemon
to it), its config (/etc/bridge/agent.toml, root:bridge 0640), the enrollment token
(/etc/bridge/token, root:bridge 0640, removed once the agent has enrolled), the state directory
(/var/lib/bridge, 0700) and a hardened systemd unit (bridge-daemon.service) that runs as the
system user "bridge". Running it again with the same settings changes nothing; new settings
are applied; a new version becomes "current" (the one before is kept as "previous") and keeps
the agent's identity and installed handlers (the state directory is never touched, but for a
pending self-update, which an install replaces).

Platform:
  --url URL            the platform, https://HOST:PORT (wss://HOST:PORT/agent also accepted)
  --server-pin HEX     SHA-256 of the platform's TLS public key (64 hex); repeatable. Used for
                       the downloads (curl --pinnedpubkey) and written to the agent's config
  --ca-file FILE       PEM CA certificates for the platform instead of (or with) pins; copied
                       to /etc/bridge/platform-ca.pem. Neither: the system trust store
  --token-stdin        read the one-time enrollment token from standard input (a prompt
                       without echo on a terminal)
  --token-file FILE    read the token from FILE
  --token TOKEN        the token itself (discouraged: visible in the process list and history)
                       Without a token, an existing /etc/bridge/token is kept
  --version V          install agent version V (default: the platform's current one)
  --release-key KEY    the release public key: a PEM file or ed25519:... ; the signed release
                       manifest must then verify (needs OpenSSL 3), and the agent may update
                       itself to releases this key signed
  --trusted-key PUB    a publisher key (ed25519:...) whose signed handlers may run;
                       repeatable. Unsigned handlers are never allowed
  --proxy URL          download through this HTTPS proxy (default: the https_proxy environment)
  --no-proxy           ignore any proxy environment for the downloads
  --arch ARCH          download for ARCH (default: uname -m) - for packagers

Installation:
  --prefix DIR         where bin/bridge-daemon and lib/bridge go (default /usr/local)
  --root DIR           install into a staging root (paths under DIR, no systemctl, no useradd:
                       they are printed instead); config paths stay those of the target system
  --user NAME          the service's system user (default bridge; created if missing)
  --run-as-root        run the agent as root (for allowlisted shell commands that need it);
                       weakens the sandbox, see installers/README.md
  --keep-config        leave an existing agent.toml as it is (hand-edited configs)
  --no-start           install but do not enable or (re)start the service
  --enroll-wait SECS   after starting the service, wait up to SECS (default 30) for the agent
                       to record its enrollment, then remove the token file; 0: do not wait
  --dry-run            print every action, change nothing
  --uninstall          stop and remove the service and the binaries (config and state kept)
  --purge              with --uninstall: also remove /etc/bridge and /var/lib/bridge (the
                       agent's identity: it will have to enroll again)
  -h, --help           this help

Exit status: 0 on success (also "nothing to change"), 1 on any error (nothing half-installed),
2 on a usage error.
EOF
}

say() { printf '%s: %s\n' "$PROG" "$*"; }
warn() { printf '%s: warning: %s\n' "$PROG" "$*" >&2; }
die() {
    printf '%s: error: %s\n' "$PROG" "$*" >&2
    exit 1
}
usage_error() {
    printf '%s: %s (see --help)\n' "$PROG" "$*" >&2
    exit 2
}
have() { command -v "$1" >/dev/null 2>&1; }

# ---------------------------------------------------------------------------- options
URL=
TOKEN=
TOKEN_SOURCE=
PINS=
CA_FILE=
VERSION=
RELEASE_KEY=
TRUSTED_KEYS=
PROXY=
NO_PROXY=0
ARCH=
PREFIX=/usr/local
ROOT=
SVC_USER=bridge
RUN_AS_ROOT=0
KEEP_CONFIG=0
NO_START=0
ENROLL_WAIT=30
DRY_RUN=0
UNINSTALL=0
PURGE=0

need_value() {
    [ "$#" -ge 2 ] || usage_error "$1 needs a value"
}

while [ "$#" -gt 0 ]; do
    opt=$1
    case $opt in
        --*=*)
            # --opt=value: split and handle as --opt value.
            value=${opt#*=}
            opt=${opt%%=*}
            shift
            set -- "$opt" "$value" "$@"
            continue
            ;;
    esac
    case $opt in
        -h | --help)
            usage
            exit 0
            ;;
        --url) need_value "$@"; URL=$2; shift ;;
        --server-pin) need_value "$@"; PINS="$PINS $2"; shift ;;
        --ca-file) need_value "$@"; CA_FILE=$2; shift ;;
        --token) need_value "$@"; TOKEN=$2; TOKEN_SOURCE=argument; shift ;;
        --token-file) need_value "$@"; TOKEN_SOURCE="file"; TOKEN_FILE_IN=$2; shift ;;
        --token-stdin) TOKEN_SOURCE=stdin ;;
        --version) need_value "$@"; VERSION=$2; shift ;;
        --release-key) need_value "$@"; RELEASE_KEY=$2; shift ;;
        --trusted-key) need_value "$@"; TRUSTED_KEYS="$TRUSTED_KEYS $2"; shift ;;
        --proxy) need_value "$@"; PROXY=$2; shift ;;
        --no-proxy) NO_PROXY=1 ;;
        --arch) need_value "$@"; ARCH=$2; shift ;;
        --prefix) need_value "$@"; PREFIX=$2; shift ;;
        --root) need_value "$@"; ROOT=$2; shift ;;
        --user) need_value "$@"; SVC_USER=$2; shift ;;
        --run-as-root) RUN_AS_ROOT=1 ;;
        --keep-config) KEEP_CONFIG=1 ;;
        --no-start) NO_START=1 ;;
        --enroll-wait) need_value "$@"; ENROLL_WAIT=$2; shift ;;
        --dry-run) DRY_RUN=1 ;;
        --uninstall) UNINSTALL=1 ;;
        --purge) PURGE=1 ;;
        *) usage_error "unknown option: $opt" ;;
    esac
    shift
done

# ---------------------------------------------------------------------------- validation
case $PREFIX in
    /*) ;;
    *) usage_error "--prefix must be an absolute path" ;;
esac
case $PREFIX in
    *[!A-Za-z0-9/._-]*) usage_error "--prefix may only contain letters, digits and / . _ -" ;;
esac
PREFIX=${PREFIX%/}
if [ -n "$ROOT" ]; then
    case $ROOT in
        /*) ;;
        *) ROOT=$(pwd)/$ROOT ;;
    esac
    ROOT=${ROOT%/}
    [ "$ROOT" != "" ] || usage_error "--root / is the real system: leave --root out"
fi
case $SVC_USER in
    '' | -* | *[!a-z0-9_-]*) usage_error "--user must be a plain user name" ;;
esac
[ "$PURGE" = 0 ] || [ "$UNINSTALL" = 1 ] || usage_error "--purge goes with --uninstall"
case $ENROLL_WAIT in
    '' | *[!0-9]*) usage_error "--enroll-wait must be a number of seconds" ;;
esac
[ "${#ENROLL_WAIT}" -le 4 ] || usage_error "--enroll-wait is at most 9999 seconds"
if [ "$RUN_AS_ROOT" = 1 ]; then
    SVC_USER=root
fi

# The target system's paths, and where they are on this machine (under --root).
# The layout (root's): releases/VERSION/bridge-daemon, "current" and "previous" links to
# releases, the launcher the unit runs (never replaced by a self-update) and its state.json.
LAYOUT_PATH=$PREFIX/lib/bridge
LAUNCHER_PATH=$LAYOUT_PATH/bridge-launcher
LAYOUT_STATE_PATH=$LAYOUT_PATH/state.json
# A link into the layout: always the current release.
BIN_PATH=$PREFIX/bin/bridge-daemon
BIN_TARGET=../lib/bridge/current/bridge-daemon
ETC_PATH=/etc/bridge
CONF_PATH=$ETC_PATH/agent.toml
TOKEN_PATH=$ETC_PATH/token
CA_PATH=$ETC_PATH/platform-ca.pem
STATE_PATH=/var/lib/bridge
# Written by the agent (0600) once the platform has accepted its enrollment; from then on the
# agent never reads or sends the token again.
ENROLLED_PATH=$STATE_PATH/enrolled
# A release the agent received and verified, waiting for the launcher's root step to install it.
STAGED_PATH=$STATE_PATH/update/staged
UNIT_PATH=/etc/systemd/system/$SERVICE

R=$ROOT
CHANGES=0
WORK=

cleanup() {
    if [ -n "$WORK" ] && [ -d "$WORK" ]; then
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Runs "$@", or prints it under --dry-run.
act() {
    if [ "$DRY_RUN" = 1 ]; then
        say "would run: $*"
    else
        "$@"
    fi
}

# The real system's service manager: systemd, or none we drive.
has_systemd() {
    [ -z "$ROOT" ] && [ -d /run/systemd/system ] && have systemctl
}

# Runs systemctl, or prints what would run under --root / without systemd. Under --root,
# BRIDGE_INSTALL_SYSTEMCTL names a program to run instead (a packaging pipeline's or a test's
# own service manager); it gets systemctl's arguments.
STAGING_SYSTEMCTL=${BRIDGE_INSTALL_SYSTEMCTL:-}
sysctl_run() {
    if [ -n "$ROOT" ]; then
        if [ -n "$STAGING_SYSTEMCTL" ]; then
            act "$STAGING_SYSTEMCTL" "$@"
        else
            say "not run (--root): systemctl $*"
        fi
    elif has_systemd; then
        act systemctl "$@"
    fi
}

if [ "$DRY_RUN" = 0 ] && [ -z "$ROOT" ] && [ "$(id -u)" != 0 ]; then
    die "run as root (sudo sh $0 ...), or use --root DIR to stage an install or --dry-run"
fi

# ---------------------------------------------------------------------------- file helpers
# uid:gid of the service user on the target system, or empty when it cannot be known.
OWNER=
resolve_owner() {
    if [ "$SVC_USER" = root ]; then
        OWNER=
        # Staging as an ordinary user (--root): files stay the caller's.
        [ "$(id -u)" != 0 ] || OWNER=0:0
    elif [ -n "$ROOT" ]; then
        OWNER=
        if [ -f "$ROOT/etc/passwd" ]; then
            OWNER=$(awk -F: -v u="$SVC_USER" '$1 == u { print $3 ":" $4; exit }' "$ROOT/etc/passwd")
        fi
    else
        OWNER=
        if id "$SVC_USER" >/dev/null 2>&1; then
            OWNER=$(id -u "$SVC_USER"):$(id -g "$SVC_USER")
        fi
    fi
}

# make_dir PATH: creates a system directory (PREFIX/bin, the unit directory) if missing; an
# existing one is left as it is.
make_dir() {
    if [ ! -d "$1" ]; then
        CHANGES=$((CHANGES + 1))
        act mkdir -p "$1"
    fi
}

# ensure_dir PATH MODE OWNER: creates PATH or fixes its mode and owner.
ensure_dir() {
    _d=$1 _mode=$2 _own=$3
    if [ ! -d "$_d" ]; then
        CHANGES=$((CHANGES + 1))
        act mkdir -p "$_d"
    elif [ "$(stat -c %a "$_d")" = "${_mode#0}" ] && { [ -z "$_own" ] || [ "$(stat -c %u:%g "$_d")" = "$_own" ]; }; then
        return 0
    else
        CHANGES=$((CHANGES + 1))
    fi
    act chmod "$_mode" "$_d"
    if [ -n "$_own" ]; then
        act chown "$_own" "$_d"
    fi
}

# put_file SRC DEST MODE OWNER: installs SRC as DEST atomically (a temporary file in the same
# directory, then rename) unless DEST already has that content, mode and owner.
put_file() {
    _src=$1 _dest=$2 _mode=$3 _own=$4
    if [ -f "$_dest" ] && cmp -s "$_src" "$_dest"; then
        if [ "$(stat -c %a "$_dest")" = "${_mode#0}" ] && { [ -z "$_own" ] || [ "$(stat -c %u:%g "$_dest")" = "$_own" ]; }; then
            return 0
        fi
        CHANGES=$((CHANGES + 1))
        act chmod "$_mode" "$_dest"
        if [ -n "$_own" ]; then
            act chown "$_own" "$_dest"
        fi
        return 0
    fi
    CHANGES=$((CHANGES + 1))
    _tmp=$(dirname "$_dest")/.$(basename "$_dest").new.$$
    if [ "$DRY_RUN" = 1 ]; then
        say "would install $_dest (mode $_mode${_own:+, owner $_own})"
        return 0
    fi
    say "installing $_dest"
    rm -f "$_tmp"
    (umask 077 && cp "$_src" "$_tmp")
    chmod "$_mode" "$_tmp"
    if [ -n "$_own" ]; then
        chown "$_own" "$_tmp"
    fi
    mv -f "$_tmp" "$_dest"
}

# remove PATH: removes a file (or, with -r, a tree) if it exists.
remove() {
    if [ "$1" = -r ]; then
        shift
        if [ -e "$1" ]; then
            CHANGES=$((CHANGES + 1))
            act rm -rf "$1"
        fi
    elif [ -e "$1" ] || [ -L "$1" ]; then
        CHANGES=$((CHANGES + 1))
        act rm -f "$1"
    fi
}

# set_link PATH TARGET: makes PATH a symbolic link to TARGET unless it is one already; whatever
# was there (an older link, a regular file) is replaced atomically (a new link renamed over it).
set_link() {
    _l=$1 _t=$2
    if [ -L "$_l" ] && [ "$(readlink "$_l")" = "$_t" ]; then
        return 0
    fi
    CHANGES=$((CHANGES + 1))
    if [ "$DRY_RUN" = 1 ]; then
        say "would link $_l -> $_t"
        return 0
    fi
    say "linking $_l -> $_t"
    _tmp=$(dirname "$_l")/.$(basename "$_l").new.$$
    rm -f "$_tmp"
    ln -s "$_t" "$_tmp"
    mv -fT "$_tmp" "$_l"
}

# A release version (it names a directory of the layout, which the launcher reads back): a
# semantic version (MAJOR.MINOR.PATCH, optional -PRERELEASE and +BUILD), at most 64 bytes.
valid_version() {
    _vv=$1
    if [ -z "$_vv" ] || [ "${#_vv}" -gt 64 ]; then
        return 1
    fi
    _vv_core=${_vv%%[-+]*}
    _vv_rest=${_vv#"$_vv_core"}
    _vv_ids "$_vv_core" core || return 1
    case $_vv_rest in
        '') ;;
        +*) _vv_ids "${_vv_rest#+}" build || return 1 ;;
        *)
            _vv_pre=${_vv_rest#-}
            case $_vv_pre in
                *+*)
                    _vv_ids "${_vv_pre#*+}" build || return 1
                    _vv_pre=${_vv_pre%%+*}
                    ;;
            esac
            _vv_ids "$_vv_pre" pre || return 1
            ;;
    esac
}

# _vv_ids IDS KIND: IDS is dot-separated identifiers of semantic versioning's KIND: core (three
# numbers without leading zeros), pre (letters, digits, -; numbers without leading zeros) or
# build (letters, digits, -).
_vv_ids() {
    _vv_s=$1.
    _vv_n=0
    while [ -n "$_vv_s" ]; do
        _vv_id=${_vv_s%%.*}
        _vv_s=${_vv_s#*.}
        _vv_n=$((_vv_n + 1))
        case $_vv_id in
            '' | *[!0-9A-Za-z-]*) return 1 ;;
        esac
        case $2 in
            core)
                case $_vv_id in
                    *[!0-9]* | 0?*) return 1 ;;
                esac
                ;;
            pre)
                case $_vv_id in
                    0?*) case $_vv_id in *[!0-9]*) ;; *) return 1 ;; esac ;;
                esac
                ;;
        esac
    done
    [ "$2" != core ] || [ "$_vv_n" = 3 ]
}

# Under --root: removes the now empty directories from DIR up to the root.
prune_dirs() {
    [ -n "$ROOT" ] || return 0
    _p=$1
    while [ "$_p" != "$ROOT" ] && [ "${_p#"$ROOT"/}" != "$_p" ]; do
        if [ -d "$_p" ] && [ -z "$(ls -A "$_p")" ]; then
            act rmdir "$_p"
        else
            break
        fi
        _p=$(dirname "$_p")
    done
}

# ---------------------------------------------------------------------------- uninstall
if [ "$UNINSTALL" = 1 ]; then
    if [ -n "$ROOT" ] || has_systemd; then
        if [ -f "$R$UNIT_PATH" ]; then
            sysctl_run disable --now "$SERVICE" || warn "could not stop $SERVICE"
        fi
    else
        say "no systemd: stop a bridge-daemon you started by hand yourself"
    fi
    had_unit=0
    [ -f "$R$UNIT_PATH" ] && had_unit=1
    remove "$R$UNIT_PATH"
    if [ "$had_unit" = 1 ]; then
        sysctl_run daemon-reload || true
    fi
    remove "$R$BIN_PATH"
    remove -r "$R$LAYOUT_PATH"
    if [ "$PURGE" = 1 ]; then
        remove -r "$R$ETC_PATH"
        remove -r "$R$STATE_PATH"
        if [ -z "$ROOT" ] && [ "$SVC_USER" != root ] && id "$SVC_USER" >/dev/null 2>&1; then
            home=$(awk -F: -v u="$SVC_USER" '$1 == u { print $6; exit }' /etc/passwd)
            if [ "$home" = "$STATE_PATH" ] && have userdel; then
                CHANGES=$((CHANGES + 1))
                act userdel "$SVC_USER" || warn "could not remove the user $SVC_USER"
            fi
        fi
    fi
    prune_dirs "$R$(dirname "$BIN_PATH")"
    prune_dirs "$R$(dirname "$LAYOUT_PATH")"
    prune_dirs "$R$(dirname "$UNIT_PATH")"
    if [ "$PURGE" = 1 ]; then
        prune_dirs "$R$(dirname "$STATE_PATH")"
        prune_dirs "$R$(dirname "$ETC_PATH")"
    fi
    if [ "$CHANGES" = 0 ]; then
        say "nothing to remove"
    elif [ "$DRY_RUN" = 1 ]; then
        say "dry run: nothing was changed"
    elif [ "$PURGE" = 1 ]; then
        say "removed the agent, its config and its state"
    else
        say "removed the agent; kept $ETC_PATH and $STATE_PATH (the agent's identity): --purge removes them"
    fi
    exit 0
fi

# ---------------------------------------------------------------------------- install: inputs
[ -n "$URL" ] || usage_error "--url is required"
case $URL in
    https://*) AUTHORITY=${URL#https://} ;;
    wss://*) AUTHORITY=${URL#wss://} ;;
    http://* | ws://*) die "--url must be https:// (the agent and this installer never use plain http)" ;;
    *) usage_error "--url must look like https://HOST:PORT" ;;
esac
AUTHORITY=${AUTHORITY%%/*}
case $AUTHORITY in
    '' | *[!A-Za-z0-9.:\[\]-]*) usage_error "--url has an invalid host: $URL" ;;
esac
BASE_URL=https://$AUTHORITY
SERVER_URL=wss://$AUTHORITY/agent

PIN_LIST=
for pin in $PINS; do
    pin=${pin#sha256:}
    pin=$(printf '%s' "$pin" | tr 'A-F' 'a-f')
    case $pin in
        *[!0-9a-f]*) usage_error "--server-pin must be 64 hex characters: $pin" ;;
    esac
    [ "${#pin}" = 64 ] || usage_error "--server-pin must be 64 hex characters: $pin"
    PIN_LIST="$PIN_LIST $pin"
done
PIN_LIST=${PIN_LIST# }

if [ -n "$CA_FILE" ]; then
    [ -r "$CA_FILE" ] || die "cannot read --ca-file $CA_FILE"
    grep -q 'BEGIN CERTIFICATE' "$CA_FILE" || die "--ca-file $CA_FILE holds no PEM certificate"
fi

for key in $TRUSTED_KEYS; do
    case $key in
        ed25519:*) ;;
        *) usage_error "--trusted-key must be ed25519:... (the line of a bridgectl .pub file)" ;;
    esac
    body=${key#ed25519:}
    case $body in
        *[!A-Za-z0-9_-]*) usage_error "--trusted-key $key is not base64url" ;;
    esac
    [ "${#body}" = 43 ] || usage_error "--trusted-key $key is not a 32-byte key"
done

if [ -n "$VERSION" ] && ! valid_version "$VERSION"; then
    usage_error "--version must be a semantic version such as 1.2.0 or 1.3.0-rc.1"
fi

if [ -z "$ARCH" ]; then
    os=$(uname -s)
    [ "$os" = Linux ] || die "this installer supports Linux only (this is $os)"
    ARCH=$(uname -m)
fi
case $ARCH in
    amd64) ARCH=x86_64 ;;
    arm64) ARCH=aarch64 ;;
esac
case $ARCH in
    '' | *[!A-Za-z0-9_]*) usage_error "--arch: invalid architecture $ARCH" ;;
esac

# The token: never on a command line we run, written to a 0600 file only.
TOKEN_FILE_IN=${TOKEN_FILE_IN:-}
case $TOKEN_SOURCE in
    argument) warn "--token is visible to other users in the process list and stays in shell history; prefer --token-stdin or --token-file" ;;
    file)
        [ -r "$TOKEN_FILE_IN" ] || die "cannot read --token-file $TOKEN_FILE_IN"
        TOKEN=$(head -n 1 "$TOKEN_FILE_IN")
        ;;
    stdin)
        if [ -t 0 ]; then
            printf 'enrollment token: ' >&2
            stty -echo 2>/dev/null || true
            IFS= read -r TOKEN || true
            stty echo 2>/dev/null || true
            printf '\n' >&2
        else
            IFS= read -r TOKEN || [ -n "$TOKEN" ] || die "--token-stdin: nothing on standard input"
        fi
        ;;
esac
TOKEN=$(printf '%s' "$TOKEN" | tr -d ' \t\r\n')
if [ -n "$TOKEN_SOURCE" ]; then
    [ -n "$TOKEN" ] || die "the enrollment token is empty"
    case $TOKEN in
        *[!A-Za-z0-9._~+/=-]*) die "the enrollment token has unexpected characters" ;;
    esac
    [ "${#TOKEN}" -le 1024 ] || die "the enrollment token is too long"
fi

if [ -z "$PIN_LIST" ] && [ -z "$CA_FILE" ]; then
    warn "no --server-pin or --ca-file: the platform's certificate is checked against the system trust store"
fi

# ---------------------------------------------------------------------------- download and verify
DOWNLOADER=
if have curl; then
    DOWNLOADER=curl
elif have wget; then
    DOWNLOADER=wget
    [ -z "$PIN_LIST" ] || [ -n "$CA_FILE" ] ||
        die "wget cannot check --server-pin: install curl, or give --ca-file (the platform's CA certificate)"
else
    die "neither curl nor wget is installed: install one of them"
fi

# hex → base64 of the bytes, for curl's sha256//BASE64 pins.
hex_to_base64() {
    _esc=
    _h=$1
    while [ -n "$_h" ]; do
        _rest=${_h#??}
        _pair=${_h%"$_rest"}
        _h=$_rest
        _esc="$_esc\\$(printf '%03o' "$((0x$_pair))")"
    done
    # shellcheck disable=SC2059 # the format is the escapes built above
    if have base64; then
        printf "$_esc" | base64 | tr -d '\n'
    elif have openssl; then
        printf "$_esc" | openssl base64 -A
    else
        die "need base64 (coreutils) or openssl to use --server-pin"
    fi
}

CURL_PIN=
for pin in $PIN_LIST; do
    CURL_PIN="${CURL_PIN:+$CURL_PIN;}sha256//$(hex_to_base64 "$pin")"
done

# fetch URL OUT MAX: downloads over https only, checking the platform by pin and/or CA; at
# most MAX bytes (curl refuses a larger announced length; curl 8.4 and later also stops a
# transfer that grows past it).
fetch() {
    _url=$1 _out=$2 _max=$3
    if [ "$DOWNLOADER" = curl ]; then
        set -- -fsS --proto =https --proto-redir =https --connect-timeout 15 --max-time 900 \
            --retry 2 --max-filesize "$_max" -o "$_out"
        [ -z "$CA_FILE" ] || set -- "$@" --cacert "$CA_FILE"
        if [ -n "$CURL_PIN" ]; then
            set -- "$@" --pinnedpubkey "$CURL_PIN"
            # Without a CA file the pin is the check (curl enforces it even with -k).
            [ -n "$CA_FILE" ] || set -- "$@" -k
        fi
        [ -z "$PROXY" ] || set -- "$@" --proxy "$PROXY"
        [ "$NO_PROXY" = 0 ] || set -- "$@" --noproxy '*'
        _rc=0
        curl "$@" "$_url" || _rc=$?
        case $_rc in
            0) return 0 ;;
            63) die "$_url is larger than $_max bytes; nothing was installed" ;;
            90) die "the platform's TLS key does not match --server-pin (curl: $_url)" ;;
            60 | 35 | 58 | 77) die "TLS with the platform failed (curl exit $_rc): check --ca-file / --server-pin ($_url)" ;;
            6 | 7 | 28) die "the platform is unreachable (curl exit $_rc): $_url - check --url, the network and the proxy" ;;
            22) die "the platform refused or does not have $_url (HTTP error; check --url, --version and the architecture $ARCH)" ;;
            *) die "download failed (curl exit $_rc): $_url" ;;
        esac
    else
        set -- -q --https-only --timeout=15 --tries=3 -O "$_out"
        [ -z "$CA_FILE" ] || set -- "$@" --ca-certificate="$CA_FILE"
        [ -z "$PROXY" ] || set -- "$@" -e use_proxy=yes -e "https_proxy=$PROXY"
        [ "$NO_PROXY" = 0 ] || set -- "$@" --no-proxy
        _rc=0
        wget "$@" "$_url" || _rc=$?
        case $_rc in
            0) return 0 ;;
            4) die "the platform is unreachable (wget exit 4): $_url - check --url, the network and the proxy" ;;
            5) die "TLS with the platform failed (wget exit 5): check --ca-file ($_url)" ;;
            8) die "the platform refused or does not have $_url (HTTP error; check --url, --version and the architecture $ARCH)" ;;
            *) die "download failed (wget exit $_rc): $_url" ;;
        esac
    fi
}

sha256_of() {
    if have sha256sum; then
        sha256sum "$1" | cut -d ' ' -f 1
    elif have shasum; then
        shasum -a 256 "$1" | cut -d ' ' -f 1
    elif have openssl; then
        openssl dgst -sha256 -r "$1" | cut -d ' ' -f 1
    else
        die "need sha256sum, shasum or openssl to check the download"
    fi
}

WORK=$(mktemp -d "${TMPDIR:-/tmp}/bridge-install.XXXXXX")
chmod 700 "$WORK"

# The release key: as a PEM file for openssl (an ed25519:... key is wrapped in its SPKI), in
# the config's form (ed25519:BASE64URL) and its key id (the first half of the SHA-256 of its
# 32 bytes, as a manifest names it).
RELEASE_PEM=
RELEASE_KEY_CONF=
RELEASE_KEY_ID=
SPKI_ED25519=302a300506032b6570032100
if [ -n "$RELEASE_KEY" ]; then
    have openssl || die "--release-key needs openssl (3.0 or later) to check the release manifest"
    case $RELEASE_KEY in
        ed25519:*)
            body=$(printf '%s' "${RELEASE_KEY#ed25519:}" | tr '_-' '/+')
            case ${#body} in
                43) body="$body=" ;;
                *) die "--release-key $RELEASE_KEY is not a 32-byte ed25519 key" ;;
            esac
            {
                printf '\060\052\060\005\006\003\053\145\160\003\041\000'
                printf '%s\n' "$body" | openssl base64 -d -A
            } >"$WORK/release.der"
            [ "$(wc -c <"$WORK/release.der" | tr -d ' ')" = 44 ] ||
                die "--release-key $RELEASE_KEY does not decode to a 32-byte key"
            {
                echo '-----BEGIN PUBLIC KEY-----'
                openssl base64 -A <"$WORK/release.der"
                echo
                echo '-----END PUBLIC KEY-----'
            } >"$WORK/release.pem"
            RELEASE_PEM=$WORK/release.pem
            ;;
        *)
            [ -r "$RELEASE_KEY" ] || die "cannot read --release-key $RELEASE_KEY"
            RELEASE_PEM=$RELEASE_KEY
            ;;
    esac
    openssl pkey -pubin -in "$RELEASE_PEM" -outform DER -out "$WORK/release.der" 2>/dev/null ||
        die "--release-key is not a usable public key"
    if [ "$(wc -c <"$WORK/release.der" | tr -d ' ')" != 44 ] ||
        [ "$(head -c 12 "$WORK/release.der" | od -An -tx1 | tr -d ' \n')" != "$SPKI_ED25519" ]; then
        die "--release-key is not an Ed25519 public key"
    fi
    tail -c 32 "$WORK/release.der" >"$WORK/release.raw"
    RELEASE_KEY_CONF=ed25519:$(openssl base64 -A <"$WORK/release.raw" | tr '+/' '-_' | tr -d '=')
    RELEASE_KEY_ID=$(sha256_of "$WORK/release.raw" | cut -c 1-32)
fi

# The largest binary downloaded without a manifest giving its size (the agent's own limit for
# a self-update, [update] max_binary_bytes, by default).
MAX_BINARY=536870912
NAME=bridge-daemon-linux-$ARCH
DL=$BASE_URL/downloads/${VERSION:+$VERSION/}$NAME

# verify_manifest FILE: the signed release manifest (installers/README.md), format 1 or 2: its
# format, its signature under --release-key (over "bridge.release.v1\0" and every line before
# "signature "), then what it says: os, arch and, with --version, the version. Sets MF_FORMAT,
# MF_VERSION, MF_SIZE, MF_SHA256 and, for format 2 (the binary served as a gzip archive),
# MF_ARCHIVE_SIZE and MF_ARCHIVE_SHA256.
verify_manifest() {
    _m=$1
    _bad="the release manifest $DL.manifest"
    [ "$(wc -c <"$_m" | tr -d ' ')" -le 4096 ] || die "$_bad is larger than 4096 bytes; nothing was installed"
    if LC_ALL=C grep -q '[^ -~]' "$_m" || [ "$(tail -c 1 "$_m" | od -An -tx1 | tr -d ' \n')" != 0a ]; then
        die "$_bad is malformed (not lines of printable ASCII); nothing was installed"
    fi
    _fields=$(cut -d ' ' -f 1 "$_m" | tr '\n' ' ')
    case $(sed -n 1p "$_m") in
        'bridge-release 1')
            MF_FORMAT=1
            [ "$_fields" = "bridge-release version os arch size sha256 key signature " ] ||
                die "$_bad is malformed (a format-1 manifest is the lines bridge-release 1, version, os, arch, size, sha256, key, signature); nothing was installed"
            ;;
        'bridge-release 2')
            MF_FORMAT=2
            [ "$_fields" = "bridge-release version os arch size sha256 archive archive_size archive_sha256 key binary_signature signature " ] ||
                die "$_bad is malformed (a format-2 manifest is the lines bridge-release 2, version, os, arch, size, sha256, archive, archive_size, archive_sha256, key, binary_signature, signature); nothing was installed"
            ;;
        'bridge-release '*)
            die "$_bad is of an unknown format ($(sed -n 1p "$_m")); this installer reads formats 1 and 2; nothing was installed"
            ;;
        *)
            die "$_bad is malformed (its first line must be bridge-release 1 or bridge-release 2); nothing was installed"
            ;;
    esac
    _key=$(sed -n 's/^key //p' "$_m")
    [ "$_key" = "$RELEASE_KEY_ID" ] ||
        die "$_bad is signed by key $_key, not by --release-key (key $RELEASE_KEY_ID); nothing was installed"
    {
        printf 'bridge.release.v1\000'
        sed '/^signature /,$d' "$_m"
    } >"$WORK/manifest.signed"
    sed -n 's/^signature //p' "$_m" | openssl base64 -d -A >"$WORK/manifest.sig" 2>/dev/null || true
    [ "$(wc -c <"$WORK/manifest.sig" | tr -d ' ')" = 64 ] ||
        die "$_bad is malformed (the signature is not 64 bytes of base64); nothing was installed"
    if ! openssl pkeyutl -verify -pubin -inkey "$RELEASE_PEM" -rawin -in "$WORK/manifest.signed" \
        -sigfile "$WORK/manifest.sig" >/dev/null 2>&1; then
        die "the signature of the release manifest $DL.manifest does not verify under --release-key; nothing was installed"
    fi
    say "release manifest signature verified (key $RELEASE_KEY_ID)"
    _os=$(sed -n 's/^os //p' "$_m")
    [ "$_os" = linux ] || die "the release manifest is for the OS $_os, not linux; nothing was installed"
    _arch=$(sed -n 's/^arch //p' "$_m")
    [ "$_arch" = "$ARCH" ] ||
        die "the release manifest is for the architecture $_arch, not $ARCH; nothing was installed"
    MF_VERSION=$(sed -n 's/^version //p' "$_m")
    valid_version "$MF_VERSION" || die "$_bad has an invalid version $MF_VERSION; nothing was installed"
    if [ -n "$VERSION" ] && [ "$MF_VERSION" != "$VERSION" ]; then
        die "the release manifest is for version $MF_VERSION, not --version $VERSION; nothing was installed"
    fi
    MF_SIZE=$(sed -n 's/^size //p' "$_m")
    case $MF_SIZE in
        '' | *[!0-9]*) die "$_bad is malformed (size); nothing was installed" ;;
    esac
    [ "${#MF_SIZE}" -le 18 ] || die "$_bad is malformed (size); nothing was installed"
    MF_SHA256=$(sed -n 's/^sha256 //p' "$_m")
    case $MF_SHA256 in
        *[!0-9a-f]*) die "$_bad is malformed (sha256); nothing was installed" ;;
    esac
    [ "${#MF_SHA256}" = 64 ] || die "$_bad is malformed (sha256); nothing was installed"
    if [ "$MF_FORMAT" = 2 ]; then
        [ "$(sed -n 's/^archive //p' "$_m")" = gzip ] ||
            die "$_bad is malformed (archive: gzip is the one archive format); nothing was installed"
        MF_ARCHIVE_SIZE=$(sed -n 's/^archive_size //p' "$_m")
        case $MF_ARCHIVE_SIZE in
            '' | *[!0-9]*) die "$_bad is malformed (archive_size); nothing was installed" ;;
        esac
        [ "${#MF_ARCHIVE_SIZE}" -le 18 ] || die "$_bad is malformed (archive_size); nothing was installed"
        # No gzip of the binary needs more (the bound every reader of a manifest applies).
        [ "$MF_ARCHIVE_SIZE" -le $((MF_SIZE + MF_SIZE / 256 + 1024)) ] ||
            die "$_bad is malformed (archive_size $MF_ARCHIVE_SIZE is larger than any gzip archive of $MF_SIZE bytes needs); nothing was installed"
        MF_ARCHIVE_SHA256=$(sed -n 's/^archive_sha256 //p' "$_m")
        case $MF_ARCHIVE_SHA256 in
            *[!0-9a-f]*) die "$_bad is malformed (archive_sha256); nothing was installed" ;;
        esac
        [ "${#MF_ARCHIVE_SHA256}" = 64 ] || die "$_bad is malformed (archive_sha256); nothing was installed"
    fi
}

# unpack_archive: the format-2 download: the archive's size and SHA-256 checked against the
# signed manifest before it is unpacked, then unpacked no further than one byte past the
# binary's size (a larger output is refused, never written whole).
unpack_archive() {
    have gzip || die "the release is a gzip archive and gzip is not installed; nothing was installed"
    fetch "$DL.gz" "$WORK/$NAME.gz" "$MF_ARCHIVE_SIZE"
    _size=$(wc -c <"$WORK/$NAME.gz" | tr -d ' ')
    if [ "$_size" != "$MF_ARCHIVE_SIZE" ]; then
        die "size mismatch for $NAME.gz: the release manifest says $MF_ARCHIVE_SIZE bytes, downloaded $_size; nothing was installed"
    fi
    _actual=$(sha256_of "$WORK/$NAME.gz")
    if [ "$_actual" != "$MF_ARCHIVE_SHA256" ]; then
        die "checksum mismatch for $NAME.gz: the release manifest says $MF_ARCHIVE_SHA256, downloaded $_actual; nothing was installed"
    fi
    say "archive sha256 $_actual and size verified against the release manifest"
    # gzip's status is kept aside: in a pipe only head's counts. head closing the pipe early
    # (the output is too large) also fails gzip, so the size is looked at first.
    rm -f "$WORK/gzip.status"
    {
        if gzip -dc <"$WORK/$NAME.gz" 2>/dev/null; then
            echo 0 >"$WORK/gzip.status"
        else
            echo 1 >"$WORK/gzip.status"
        fi
    } | head -c $((MF_SIZE + 1)) >"$WORK/$NAME"
    rm -f "$WORK/$NAME.gz"
    _size=$(wc -c <"$WORK/$NAME" | tr -d ' ')
    if [ "$_size" -gt "$MF_SIZE" ]; then
        die "$NAME.gz unpacks to more than the $MF_SIZE bytes the release manifest says; nothing was installed"
    fi
    if [ "$(cat "$WORK/gzip.status" 2>/dev/null)" != 0 ]; then
        die "$NAME.gz is not a whole gzip archive (corrupt or cut short); nothing was installed"
    fi
}

say "downloading $DL"
if [ -n "$RELEASE_PEM" ]; then
    # The signed manifest says what the binary must be; no unsigned checksum is needed.
    fetch "$DL.manifest" "$WORK/$NAME.manifest" 4096
    verify_manifest "$WORK/$NAME.manifest"
    if [ "$MF_FORMAT" = 2 ]; then
        unpack_archive
    else
        fetch "$DL" "$WORK/$NAME" "$MF_SIZE"
    fi
    size=$(wc -c <"$WORK/$NAME" | tr -d ' ')
    if [ "$size" != "$MF_SIZE" ]; then
        die "size mismatch for $NAME: the release manifest says $MF_SIZE bytes, downloaded $size; nothing was installed"
    fi
    actual=$(sha256_of "$WORK/$NAME")
    if [ "$actual" != "$MF_SHA256" ]; then
        die "checksum mismatch for $NAME: the release manifest says $MF_SHA256, downloaded $actual; nothing was installed"
    fi
    say "sha256 $actual and size verified against the release manifest (version $MF_VERSION)"
else
    fetch "$DL.sha256" "$WORK/$NAME.sha256" 4096
    fetch "$DL" "$WORK/$NAME" "$MAX_BINARY"
    expected=$(cut -d ' ' -f 1 <"$WORK/$NAME.sha256" | head -n 1 | tr 'A-F' 'a-f')
    case $expected in
        *[!0-9a-f]*) die "the published checksum $DL.sha256 is malformed; nothing was installed" ;;
    esac
    [ "${#expected}" = 64 ] || die "the published checksum $DL.sha256 is malformed; nothing was installed"
    actual=$(sha256_of "$WORK/$NAME")
    if [ "$actual" != "$expected" ]; then
        die "checksum mismatch for $NAME: published $expected, downloaded $actual; nothing was installed"
    fi
    say "sha256 $actual verified"
fi
case $(head -c 4 "$WORK/$NAME" | od -An -c | tr -d ' ') in
    '177ELF') ;;
    *) die "the download is not a Linux executable; nothing was installed" ;;
esac
chmod 755 "$WORK/$NAME"

# The release's version names its directory: the signed manifest's; else --version, or what
# the (checksum-verified) binary prints for --version ("bridge-daemon X").
if [ -n "$RELEASE_PEM" ]; then
    VERSION=$MF_VERSION
elif [ -z "$VERSION" ]; then
    printed=
    if have timeout; then
        printed=$(timeout 10 "$WORK/$NAME" --version </dev/null 2>/dev/null) || printed=
    else
        printed=$("$WORK/$NAME" --version </dev/null 2>/dev/null) || printed=
    fi
    printed=$(printf '%s\n' "$printed" | head -n 1)
    VERSION=${printed#bridge-daemon }
    if [ "$VERSION" = "$printed" ] || ! valid_version "$VERSION"; then
        die "cannot tell the version of the downloaded $NAME (it printed \"$printed\" for --version): give --version; nothing was installed"
    fi
fi
RELEASE_DIR=releases/$VERSION

# ---------------------------------------------------------------------------- install: files
resolve_owner
if [ -z "$OWNER" ] && [ "$SVC_USER" != root ]; then
    if [ -n "$ROOT" ]; then
        say "the user $SVC_USER does not exist in $ROOT/etc/passwd: files stay owned by $(id -un); chown the config, token and state to $SVC_USER when packaging"
        say "not run (--root): useradd --system --user-group --home-dir $STATE_PATH --no-create-home --shell /usr/sbin/nologin $SVC_USER"
    else
        CHANGES=$((CHANGES + 1))
        if have useradd; then
            act useradd --system --user-group --home-dir "$STATE_PATH" --no-create-home \
                --shell /usr/sbin/nologin "$SVC_USER"
        elif have adduser; then
            act adduser -S -D -H -h "$STATE_PATH" -s /sbin/nologin "$SVC_USER"
        else
            die "cannot create the user $SVC_USER (no useradd or adduser); create it, or use --run-as-root"
        fi
        if [ "$DRY_RUN" = 0 ]; then
            resolve_owner
        else
            OWNER=
        fi
    fi
fi
if [ "$SVC_USER" = root ]; then
    warn "--run-as-root: the agent runs as root with a weaker sandbox, so that allowlisted shell commands can administer this machine"
fi
GROUP_OWNER=
[ -z "$OWNER" ] || GROUP_OWNER=0:${OWNER#*:}

# Whether the agent has recorded its enrollment: the token is then neither needed nor kept.
ENROLLED=0
[ ! -e "$R$ENROLLED_PATH" ] || ENROLLED=1
if [ "$ENROLLED" = 1 ] && [ -n "$TOKEN" ]; then
    say "the agent is already enrolled ($ENROLLED_PATH): the token is not needed and is not written"
    TOKEN=
fi

# The config: generated from the options (see installers/README.md).
CONF_TMP=$WORK/agent.toml
write_config() {
    echo "# Written by bridge's install.sh; re-running it with other settings rewrites this file"
    echo "# (the previous one is kept as agent.toml.old). See docs/configuration.md."
    echo
    echo "[agent]"
    echo "state_dir = \"$STATE_PATH\""
    echo
    echo "[platform]"
    echo "server = \"$SERVER_URL\""
    if [ "$ENROLLED" = 0 ] && { [ -n "$TOKEN" ] || [ -f "$R$TOKEN_PATH" ]; }; then
        echo "token_file = \"$TOKEN_PATH\""
    fi
    if [ -n "$PIN_LIST" ]; then
        printf 'server_pins = ['
        sep=
        for pin in $PIN_LIST; do
            printf '%s"%s"' "$sep" "$pin"
            sep=', '
        done
        echo ']'
    fi
    if [ -n "$CA_FILE" ]; then
        echo "ca_file = \"$CA_PATH\""
    fi
    echo
    echo "[trust]"
    if [ -n "$TRUSTED_KEYS" ]; then
        echo "keys = ["
        for key in $TRUSTED_KEYS; do
            echo "  { key = \"$key\" },"
        done
        echo "]"
    fi
    echo "allow_unsigned_override = false"
    if [ -n "$RELEASE_KEY_CONF" ]; then
        echo
        echo "[update]"
        echo "# Self-update: releases whose manifest this key signed (see docs/configuration.md)."
        echo "release_keys = [\"$RELEASE_KEY_CONF\"]"
    fi
    if [ "$WITH_UNIT" = 1 ]; then
        echo
        echo "[shell]"
        echo "# A supervisor ends each shell run's whole process tree; under the unit's Delegate=yes"
        echo "# each run also gets a cgroup of its own. Rules: see docs/configuration.md."
        echo "cgroup_root = \"auto\""
    fi
}
WITH_UNIT=0
if [ -n "$ROOT" ] || has_systemd; then
    WITH_UNIT=1
fi
write_config >"$CONF_TMP"

# The unit: hardened; see installers/README.md for each setting and the exposure score.
UNIT_TMP=$WORK/$SERVICE
{
    cat <<EOF
[Unit]
Description=bridge agent: runs signed WASI handlers for its management platform
After=network-online.target
Wants=network-online.target
StartLimitIntervalSec=0

[Service]
Type=simple
# The launcher (root's copy of the agent, never replaced by a self-update): as root, installs
# a staged self-update or rolls back one that did not confirm; then runs the current release.
ExecStartPre=+$LAUNCHER_PATH launcher prepare --layout $LAYOUT_PATH --config $CONF_PATH
ExecStart=$LAUNCHER_PATH launcher run --layout $LAYOUT_PATH --config $CONF_PATH
Restart=always
RestartSec=5s
TimeoutStopSec=20s
UMask=0077
NoNewPrivileges=yes
LockPersonality=yes
RestrictRealtime=yes
SystemCallArchitectures=native
# Shell runs get a cgroup each under the unit's own (the agent moves itself into a leaf of it);
# systemd 252 does not combine this with ProtectControlGroups=yes (see installers/README.md).
Delegate=yes
EOF
    if [ "$SVC_USER" != root ]; then
        cat <<EOF
User=$SVC_USER
Group=$SVC_USER
ProtectSystem=strict
ReadWritePaths=$STATE_PATH
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
PrivateUsers=yes
PrivateMounts=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
RestrictNamespaces=yes
RestrictSUIDSGID=yes
RemoveIPC=yes
KeyringMode=private
DevicePolicy=closed
CapabilityBoundingSet=
AmbientCapabilities=
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources
SystemCallErrorNumber=EPERM
EOF
    else
        cat <<EOF
# --run-as-root: no User=, and no filesystem, capability or namespace restrictions, so that
# allowlisted shell commands can administer the machine (see installers/README.md).
ProtectKernelLogs=yes
ProtectClock=yes
KeyringMode=private
EOF
    fi
    cat <<EOF

[Install]
WantedBy=multi-user.target
EOF
} >"$UNIT_TMP"

if [ -n "$TOKEN" ]; then
    (umask 077 && printf '%s\n' "$TOKEN" >"$WORK/token")
fi

# A release the agent staged gives way to this install (removed below). The state directory is
# the service user's, so root must not follow links it may have planted there: on a real
# system the removal runs with the service user's rights (setpriv); otherwise "update" must be
# a directory, not a link. Checked before anything is installed.
STAGED_AS_OWNER=0
DISCARD_STAGED=0
if [ -e "$R$STAGED_PATH" ] || [ -L "$R$STAGED_PATH" ]; then
    DISCARD_STAGED=1
    if [ -z "$ROOT" ] && [ -n "$OWNER" ] && [ "$OWNER" != 0:0 ] && have setpriv; then
        STAGED_AS_OWNER=1
    elif [ -L "$R$STATE_PATH/update" ] || [ ! -d "$R$STATE_PATH/update" ]; then
        die "$STATE_PATH/update is not a directory (a link?): remove it by hand, then run this installer again; nothing was installed"
    fi
fi
remove_staged() {
    CHANGES=$((CHANGES + 1))
    if [ "$STAGED_AS_OWNER" = 1 ]; then
        act setpriv --reuid="${OWNER%%:*}" --regid="${OWNER#*:}" --clear-groups rm -rf -- "$STAGED_PATH"
    else
        act rm -rf -- "$R$STAGED_PATH"
    fi
}
# What the messages say happens ("is") or would happen ("would be", --dry-run).
IS=is
[ "$DRY_RUN" = 0 ] || IS="would be"

# ---------------------------------------------------------------------------- install: apply
BIN_CHANGED=0
before=$CHANGES
if [ "$SVC_USER" = root ]; then
    ETC_MODE=0700
else
    ETC_MODE=0750
fi
[ -n "$ROOT" ] && [ "$DRY_RUN" = 0 ] && [ ! -d "$ROOT" ] && mkdir -p "$ROOT"
# The layout is root's (0755 directories, 0755 binaries): the service user can run the
# releases, not change them. (Staging as an ordinary user: the caller's.)
ROOT_OWNER=
[ "$(id -u)" != 0 ] || ROOT_OWNER=0:0
ensure_dir "$R$LAYOUT_PATH" 0755 "$ROOT_OWNER"
ensure_dir "$R$LAYOUT_PATH/releases" 0755 "$ROOT_OWNER"
ensure_dir "$R$LAYOUT_PATH/$RELEASE_DIR" 0755 "$ROOT_OWNER"
put_file "$WORK/$NAME" "$R$LAYOUT_PATH/$RELEASE_DIR/bridge-daemon" 0755 "$ROOT_OWNER"
put_file "$WORK/$NAME" "$R$LAUNCHER_PATH" 0755 "$ROOT_OWNER"
# current -> the new release; previous -> the one it replaces (kept for one manual rollback).
CURRENT_BEFORE=
PREVIOUS_NOW=
if [ -L "$R$LAYOUT_PATH/current" ]; then
    CURRENT_BEFORE=$(readlink "$R$LAYOUT_PATH/current")
fi
if [ -L "$R$LAYOUT_PATH/previous" ]; then
    PREVIOUS_NOW=$(readlink "$R$LAYOUT_PATH/previous")
fi
if [ -n "$CURRENT_BEFORE" ] && [ "$CURRENT_BEFORE" != "$RELEASE_DIR" ] &&
    valid_version "${CURRENT_BEFORE#releases/}" && [ -d "$R$LAYOUT_PATH/$CURRENT_BEFORE" ]; then
    set_link "$R$LAYOUT_PATH/previous" "$CURRENT_BEFORE"
    PREVIOUS_NOW=$CURRENT_BEFORE
fi
set_link "$R$LAYOUT_PATH/current" "$RELEASE_DIR"
# A pending self-update (a switch awaiting confirmation, or a release the agent staged) gives
# way to this install: the launcher must neither roll it back nor install the staged one.
printf '{}' >"$WORK/state.json"
if [ -f "$R$LAYOUT_STATE_PATH" ] && ! grep -q '"pending"' "$R$LAYOUT_STATE_PATH"; then
    # No switch pending: kept as it is, with root's owner and mode.
    put_file "$R$LAYOUT_STATE_PATH" "$R$LAYOUT_STATE_PATH" 0644 "$ROOT_OWNER"
else
    if [ -f "$R$LAYOUT_STATE_PATH" ]; then
        say "a pending self-update $IS cleared: this install decides the version ($VERSION)"
    fi
    put_file "$WORK/state.json" "$R$LAYOUT_STATE_PATH" 0644 "$ROOT_OWNER"
fi
if [ "$DISCARD_STAGED" = 1 ]; then
    say "a self-update the agent staged $IS discarded: this install decides the version ($VERSION)"
    remove_staged
fi
# Releases other than current and previous are pruned.
for dir in "$R$LAYOUT_PATH"/releases/* "$R$LAYOUT_PATH"/releases/.[!.]*; do
    [ -e "$dir" ] || [ -L "$dir" ] || continue
    case releases/${dir##*/} in
        "$RELEASE_DIR" | "$PREVIOUS_NOW") ;;
        *) remove -r "$dir" ;;
    esac
done
# PREFIX/bin/bridge-daemon: the current release, whichever it is (an older installer's copy
# of the binary is replaced by the link).
make_dir "$R$(dirname "$BIN_PATH")"
set_link "$R$BIN_PATH" "$BIN_TARGET"
[ "$CHANGES" = "$before" ] || BIN_CHANGED=1

before=$CHANGES
ensure_dir "$R$ETC_PATH" "$ETC_MODE" "$GROUP_OWNER"
ensure_dir "$R$STATE_PATH" 0700 "$OWNER"
# The agent reads these through its group and cannot change them: its trust keys, shell
# allowlist, platform pins and token are root's to decide.
if [ -n "$TOKEN" ]; then
    put_file "$WORK/token" "$R$TOKEN_PATH" 0640 "$GROUP_OWNER"
elif [ "$ENROLLED" = 0 ] && [ -f "$R$TOKEN_PATH" ]; then
    # Kept as it is, but with this owner and mode (an older installer left it the agent's).
    put_file "$R$TOKEN_PATH" "$R$TOKEN_PATH" 0640 "$GROUP_OWNER"
fi
if [ "$ENROLLED" = 1 ] && [ -e "$R$TOKEN_PATH" ]; then
    say "the agent is enrolled: removing the token file"
    remove "$R$TOKEN_PATH"
fi
if [ -n "$CA_FILE" ]; then
    put_file "$CA_FILE" "$R$CA_PATH" 0640 "$GROUP_OWNER"
fi
if [ "$KEEP_CONFIG" = 1 ] && [ -f "$R$CONF_PATH" ]; then
    say "--keep-config: leaving $CONF_PATH as it is"
else
    if [ -f "$R$CONF_PATH" ] && ! cmp -s "$CONF_TMP" "$R$CONF_PATH"; then
        if [ "$DRY_RUN" = 1 ]; then
            say "would keep the previous config as $CONF_PATH.old"
        else
            (umask 077 && cp "$R$CONF_PATH" "$R$CONF_PATH.old")
            chmod 0640 "$R$CONF_PATH.old"
            [ -z "$GROUP_OWNER" ] || chown "$GROUP_OWNER" "$R$CONF_PATH.old"
        fi
    fi
    put_file "$CONF_TMP" "$R$CONF_PATH" 0640 "$GROUP_OWNER"
fi
CONF_CHANGED=0
[ "$CHANGES" = "$before" ] || CONF_CHANGED=1

UNIT_CHANGED=0
if [ -n "$ROOT" ] || has_systemd; then
    before=$CHANGES
    make_dir "$R$(dirname "$UNIT_PATH")"
    put_file "$UNIT_TMP" "$R$UNIT_PATH" 0644 "${OWNER:+0:0}"
    [ "$CHANGES" = "$before" ] || UNIT_CHANGED=1
fi

# ---------------------------------------------------------------------------- service
# RUNNING: the service was (re)started here, or was running already.
RUNNING=0
if [ -n "$ROOT" ] || has_systemd; then
    [ "$UNIT_CHANGED" = 0 ] || sysctl_run daemon-reload
    if [ "$NO_START" = 1 ]; then
        say "--no-start: start the agent with: systemctl enable --now $SERVICE"
    elif [ -n "$ROOT" ]; then
        if [ $((BIN_CHANGED + CONF_CHANGED + UNIT_CHANGED)) -gt 0 ]; then
            sysctl_run enable "$SERVICE"
            sysctl_run restart "$SERVICE"
            [ -z "$STAGING_SYSTEMCTL" ] || RUNNING=1
        fi
    else
        if ! systemctl is-enabled --quiet "$SERVICE" 2>/dev/null; then
            CHANGES=$((CHANGES + 1))
            act systemctl enable "$SERVICE"
        fi
        if ! systemctl is-active --quiet "$SERVICE" 2>/dev/null; then
            CHANGES=$((CHANGES + 1))
            act systemctl start "$SERVICE"
        elif [ $((BIN_CHANGED + CONF_CHANGED + UNIT_CHANGED)) -gt 0 ]; then
            act systemctl restart "$SERVICE"
        fi
        RUNNING=1
        [ "$DRY_RUN" = 1 ] || say "status: systemctl status $SERVICE; logs: journalctl -u $SERVICE"
    fi
else
    say "systemd is not running here: no service was installed. Run the agent by hand (or from your init system), restarting it when it exits, with, as root before each start:"
    say "  $LAUNCHER_PATH launcher prepare --layout $LAYOUT_PATH --config $CONF_PATH"
    say "then:"
    if [ "$SVC_USER" = root ]; then
        say "  $LAUNCHER_PATH launcher run --layout $LAYOUT_PATH --config $CONF_PATH"
    else
        say "  setpriv --reuid=$SVC_USER --regid=$SVC_USER --init-groups $LAUNCHER_PATH launcher run --layout $LAYOUT_PATH --config $CONF_PATH"
    fi
fi

# ---------------------------------------------------------------------------- the token
# The token is spent once the agent has enrolled (it then records $ENROLLED_PATH and never
# reads or sends the token again): it must not stay on disk for whoever reads it later.
if [ "$RUNNING" = 1 ] && [ "$DRY_RUN" = 0 ] && [ "$ENROLLED" = 0 ] && [ -f "$R$TOKEN_PATH" ]; then
    [ "$ENROLL_WAIT" = 0 ] || say "waiting up to ${ENROLL_WAIT}s for the agent to enroll"
    waited=0
    while [ ! -e "$R$ENROLLED_PATH" ] && [ "$waited" -lt "$ENROLL_WAIT" ]; do
        sleep 1
        waited=$((waited + 1))
    done
    if [ -e "$R$ENROLLED_PATH" ]; then
        ENROLLED=1
        if [ "$KEEP_CONFIG" = 1 ] && grep -q '^[[:space:]]*token_file' "$R$CONF_PATH" 2>/dev/null; then
            warn "the agent has enrolled, but --keep-config: $CONF_PATH still names token_file; delete that line, then the token: rm $TOKEN_PATH"
        else
            say "the agent has enrolled: removing the spent token $TOKEN_PATH"
            remove "$R$TOKEN_PATH"
            if [ "$KEEP_CONFIG" = 0 ]; then
                write_config >"$CONF_TMP"
                put_file "$CONF_TMP" "$R$CONF_PATH" 0640 "$GROUP_OWNER"
            fi
        fi
    else
        warn "the agent has not recorded its enrollment within ${ENROLL_WAIT}s, so the enrollment token is still in $TOKEN_PATH. Once it has enrolled ($ENROLLED_PATH exists; see journalctl -u $SERVICE), run this installer again with the same settings, which removes it, or remove it yourself: rm $TOKEN_PATH"
    fi
fi

if [ "$CHANGES" = 0 ]; then
    say "nothing to change: the agent is installed with these settings"
elif [ "$DRY_RUN" = 1 ]; then
    say "dry run: nothing was changed"
else
    say "done ($CHANGES changes); the agent's identity and handlers live in $STATE_PATH"
fi
