"""Differential test: run two versions of azure_provisioning.py (OLD, a checkout of
an earlier commit, and this repository's) on identical fresh
inputs and print every difference in what a user or Azure sees: exit status,
stdout, stderr, the health reports and requests the emulator received, the KVP
pool's records, the record (state.json) and every file written, with its mode
and owner.

    git worktree add /tmp/azp-old REV    # the version to hold this one against
    python3 tests/differential.py --old /tmp/azp-old [--only NAME[,NAME...]] [-v]

Provisioning runs as root only inside tests/support.PrivateHost (private /etc,
/home, /root, /var/lib and hostname), always with --no-publish-hostname unless
--dry-run (the publish step would reconfigure this machine's DHCP client);
--check/--status/--deprovision and usage errors run as nobody (setpriv) on a
temporary tree.  The emulator listens on 127.0.0.1 only.  Exit status: 0 no
difference, 1 differences (listed), 2 the harness itself failed."""

import argparse
import base64
import difflib
import json
import os
import re
import shutil
import stat
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.fake_azure import FakeAzure, make_ovf_env                # noqa: E402
from tests.support import PrivateHost, REPO, run_command, is_root   # noqa: E402

NOBODY = ['setpriv', '--reuid=65534', '--regid=65534', '--clear-groups']
KEY = ('ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDiffTestKeyDiffTestKeyDiffTestKeyDiffTe '
       'alice@laptop')
TEXT_MAX = 65536


# ---------------------------------------------------------------- normalizing

def normalizer(*literals):
    """text -> text with timings, timestamps, temporary paths and the given literals
    (ports, roots) replaced by placeholders."""
    pairs = [(value, name) for value, name in literals if value]
    pairs.sort(key=lambda pair: -len(pair[0]))

    def norm(text):
        if isinstance(text, bytes):
            text = text.decode('utf-8', 'replace')
        for value, name in pairs:
            text = text.replace(value, name)
        text = re.sub(r'\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:?\d\d)?', '<TS>',
                      text)
        text = re.sub(r'\b\d+(\.\d+)? ?(ms|s)\b', '<N> \\2', text)
        text = re.sub(r'127\.0\.0\.1:\d+', '127.0.0.1:<PORT>', text)
        text = re.sub(r'/tmp/[A-Za-z0-9_.-]+', '/tmp/<TMP>', text)
        text = re.sub(r'left=\d+', 'left=<N>', text)
        text = re.sub(r'\$[0-9a-z]+\$[^:\n]+', '<HASH>', text)      # crypt(3) hashes
        text = re.sub(r'\b\d+ attempts\b', '<N> attempts', text)      # bounded by time
        text = re.sub(r'(azp-media-|azure-provisioning-media\.|azure-provisioning-hooks\.)[A-Za-z0-9_]+', '\\1<X>', text)
        return text
    return norm


def norm_json(value, norm):
    if isinstance(value, dict):
        return dict((k, norm_json(v, norm)) for k, v in value.items())
    if isinstance(value, list):
        return [norm_json(v, norm) for v in value]
    if isinstance(value, float):
        return '<FLOAT>'
    if isinstance(value, str):
        return norm(value)
    return value


# ---------------------------------------------------------------- observing

def snapshot(root):
    """path -> (kind, mode, uid, gid, bytes-or-None) of everything under root."""
    entries = {}
    for top, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(top, name)
            st = os.lstat(path)
            rel = os.path.relpath(path, root)
            if stat.S_ISLNK(st.st_mode):
                entries[rel] = ('link', os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                entries[rel] = ('dir', oct(stat.S_IMODE(st.st_mode)), st.st_uid, st.st_gid)
            elif stat.S_ISREG(st.st_mode):
                with open(path, 'rb') as f:
                    data = f.read()
                entries[rel] = ('file', oct(stat.S_IMODE(st.st_mode)), st.st_uid, st.st_gid,
                                data)
            else:
                entries[rel] = ('other', oct(st.st_mode))
    return entries


def changes(before, after, norm):
    """The tree's changes, as lines: created/removed/changed paths, with their
    normalized contents (state.json and the KVP pool parsed)."""
    lines = []
    for path in sorted(set(before) | set(after)):
        old, new = before.get(path), after.get(path)
        if old == new:
            continue
        lines.append('%s %s: %s' % ('+' if old is None else '-' if new is None else '~',
                                    path, describe(path, new, norm) if new else 'removed'))
    return lines


def describe(path, entry, norm):
    if entry[0] != 'file':
        return repr(entry)
    head = 'file mode=%s uid=%d gid=%d' % entry[1:4]
    data = entry[4]
    if path.endswith('state.json'):
        try:
            record = norm_json(json.loads(data.decode()), norm)
            return head + ' json=' + json.dumps(record, sort_keys=True)
        except ValueError:
            pass
    if path.endswith('.kvp_pool_1'):
        return head + ' kvp=' + json.dumps(kvp_records(data, norm))
    if 'ssh_host_' in path:
        return head + ' <host key %d bytes>' % len(data)
    if len(data) > TEXT_MAX or b'\0' in data:
        return head + ' <%d bytes>' % len(data)
    return head + ' text=' + json.dumps(norm(data))


def kvp_records(data, norm):
    return [(data[i:i + 512].rstrip(b'\0').decode('utf-8', 'replace'),
             norm(data[i + 512:i + 2560].rstrip(b'\0')))
            for i in range(0, len(data), 2560)]


def emulator_view(az, norm):
    reports = []
    for report in az.health_reports:
        report = dict(report)
        report.pop('time', None)
        reports.append(json.dumps(norm_json(report, norm), sort_keys=True))
    requests = []
    for r in az.requests:
        line = '%s %s %s %s %s' % (r['server'], r['method'], norm(r['path']), r.get('status'),
                                   r.get('fault'))
        # retries until a deadline: how many is timing, not behaviour
        if requests and requests[-1] in (line, line + ' (repeated)'):
            requests[-1] = line + ' (repeated)'
        else:
            requests.append(line)
    return reports, requests


# ---------------------------------------------------------------- running

class Scenario(object):
    """kind: 'host' (provisioning in a PrivateHost, emulator), 'tree' (nobody,
    --root on a temporary tree built by setup(tree)), 'cli' (nobody, no tree).
    setup(place) prepares the inputs: for 'host' place is the PrivateHost, for
    'tree' the tree's directory."""

    def __init__(self, name, args, kind='host', emulator=None, setup=None, hostname='web-7',
                 timeout=60, env=None, owner=None):
        self.name, self.args, self.kind = name, list(args), kind
        self.emulator = emulator or {}
        self.setup, self.hostname, self.timeout = setup, hostname, timeout
        self.env, self.owner = env or {}, owner


def world_readable_copy(source, parent, label):
    directory = os.path.join(parent, label)
    os.mkdir(directory)
    os.chmod(directory, 0o755)
    target = os.path.join(directory, 'azure_provisioning.py')
    shutil.copyfile(os.path.join(source, 'azure_provisioning.py'), target)
    os.chmod(target, 0o644)
    return target


def observe(scenario, script, scratch):
    """One run of `script` in the scenario: a dict of normalized observations."""
    work = tempfile.mkdtemp(prefix='azp-diff-', dir=scratch)
    os.chmod(work, 0o755)
    env = dict(os.environ, LANG='C.UTF-8', LC_ALL='C.UTF-8')
    env.pop('PYTHONPATH', None)
    env.update(scenario.env)
    az = None
    try:
        if scenario.kind == 'host':
            az = FakeAzure(**scenario.emulator)
            host = PrivateHost(scenario.hostname)
            try:
                if scenario.setup:
                    scenario.setup(host)
                env = dict(env, **getattr(host, 'extra_env', {}))
                norm = normalizer((host.dir, '<HOST>'), (az.wireserver_addr, 'WIRE'),
                                  (az.imds_addr, 'IMDS'), (os.path.dirname(script), '<SCRIPTDIR>'))
                before = snapshot(host.dir)
                args = list(scenario.args)
                if '--dry-run' not in args:
                    args.append('--no-publish-hostname')
                argv = [sys.executable, '-I', script, '--wireserver', az.wireserver_addr,
                        '--imds', az.imds_addr] + args
                run = host.run(argv, timeout=scenario.timeout, env=env)
                after = snapshot(host.dir)
                hostname_after = run.hostname_after
            finally:
                host.cleanup()
                az.stop()
        else:
            tree = os.path.join(work, 'tree')
            os.mkdir(tree)
            if scenario.setup:
                scenario.setup(tree)
            if scenario.owner is not None:
                for top, dirs, files in os.walk(tree):
                    for name in dirs + files:
                        os.lchown(os.path.join(top, name), scenario.owner, scenario.owner)
                os.chown(tree, scenario.owner, scenario.owner)
            norm = normalizer((tree, '<TREE>'), (os.path.dirname(script), '<SCRIPTDIR>'))
            before = snapshot(tree)
            args = [a.replace('TREE', tree) for a in scenario.args]
            run = run_command(NOBODY + [sys.executable, '-I', script] + args, env=env,
                              timeout=scenario.timeout)
            after = snapshot(tree)
            hostname_after = None
        seen = {'exit': [str(run.code)],
                'stdout': hook_blocks_sorted(norm(run.stdout).splitlines()),
                'stderr': retries_collapsed(hook_blocks_sorted(norm(run.stderr).splitlines())),
                'files': changes(before, after, norm)}
        if hostname_after is not None:
            seen['hostname after'] = [hostname_after]
        if az is not None:
            seen['health reports'], seen['requests'] = emulator_view(az, norm)
        return seen
    finally:
        shutil.rmtree(work, ignore_errors=True)


def hook_blocks_sorted(lines):
    """A hook's stdout and stderr are two pipes read as they come: the order of
    their lines in the log is the kernel's, so each run of one hook's lines is
    compared sorted."""
    out, block = [], []
    for line in lines + [None]:
        if line is not None and re.match(r'^azure-provisioning: hook [^ ]+: ', line):
            if block and block[0].split(': ')[1] != line.split(': ')[1]:
                out.extend(sorted(block))
                block = []
            block.append(line)
            continue
        out.extend(sorted(block))
        block = []
        if line is not None:
            out.append(line)
    return out


def retries_collapsed(lines):
    """How many times a retried request is logged before a deadline is timing:
    a repeated cycle of one or two lines is kept once, marked."""
    out = []
    for line in lines:
        if out and out[-1].replace(' (repeated)', '') == line:
            out[-1] = line + ' (repeated)'
        elif len(out) >= 3 and out[-2].replace(' (repeated)', '') == line and \
                out[-3].replace(' (repeated)', '') == out[-1]:
            out.pop()
            out[-1] = out[-1].replace(' (repeated)', '') + ' (repeated)'
        else:
            out.append(line)
    return out


def hosts_file(text, hostname_file=None):
    def setup(host):
        host.write('hosts', text)
        if hostname_file is not None:
            if hostname_file is False:
                os.remove(os.path.join(host.etc, 'hostname'))
            else:
                host.write('hostname', hostname_file)
    return setup


# ---------------------------------------------------------------- inputs

def write(path, text, mode=0o644):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'wb' if isinstance(text, bytes) else 'w') as f:
        f.write(text)
    os.chmod(path, mode)


def hook(name, text, mode=0o755):
    def setup(host):
        write(os.path.join(host.etc, 'azure-provisioning', 'ready.d', name), text, mode)
    return setup


def media(ovf):
    """--media DIR, with the stand-in mount/umount of tests/test_media.py on PATH."""
    from tests.test_media import STAND_IN_MOUNT, STAND_IN_UMOUNT

    def setup(host):
        tools = os.path.join(host.dir, 'tools')
        os.mkdir(tools)
        for name, text in (('mount', STAND_IN_MOUNT), ('umount', STAND_IN_UMOUNT)):
            write(os.path.join(tools, name), text, 0o755)
        write(os.path.join(tools, 'sr0', 'ovf-env.xml'), ovf)
        os.makedirs(os.path.join(host.etc, 'ssh', 'sshd_config.d'), exist_ok=True)
        host.extra_env = {'PATH': tools + os.pathsep + os.environ['PATH'],
                          'AZP_TOOL_LOG': os.path.join(host.dir, 'tool.log')}
    return setup


def kvp_pool(then=None):
    def setup(host):
        os.makedirs(os.path.join(host.var_lib, 'hyperv'))
        if then:
            then(host)
    return setup


def both(*setups):
    def setup(host):
        for one in setups:
            one(host)
    return setup


def existing_user(host):
    with open(os.path.join(host.etc, 'passwd'), 'a') as f:
        f.write('alice:x:1500:1500::/home/alice:/bin/sh\n')
    with open(os.path.join(host.etc, 'group'), 'a') as f:
        f.write('alice:x:1500:\n')
    with open(os.path.join(host.etc, 'shadow'), 'a') as f:
        f.write('alice:!:19000:0:99999:7:::\n')
    write(os.path.join(host.home, 'alice/.ssh/authorized_keys'), 'ssh-ed25519 AAAAold old@x\n',
          0o600)


ENV_HOOK = ('#!/bin/sh\nenv | grep -E "^(AZURE|PATH|HOME|LANG|PWD|SHLVL)" | sort >&2\n'
            'echo "args: $# $*" >&2\n')


def record_dir(mode=None, as_file=False):
    def setup(host):
        path = os.path.join(host.var_lib, 'azure-provisioning')
        if as_file:
            write(path, 'not a directory\n')
        else:
            os.mkdir(path)
            os.chmod(path, mode)
    return setup


def ssh_config(host):
    os.makedirs(os.path.join(host.etc, 'ssh', 'sshd_config.d'), exist_ok=True)


GOOD_RECORD = {
    "admin_user": "alice", "admin_user_created": True, "admin_user_creating": None,
    "agent": "azure-provisioning/0.1.0", "hostname": "web-7", "incarnation": "1",
    "result": "provisioned", "ssh_host_keys": "regenerated",
    "ssh_host_keys_for": "11111111-2222-3333-4444-555555555555",
    "steps": [{"seconds": 0.5, "step": "imds"}, {"seconds": 0.01, "step": "hostname"},
              {"seconds": 0.2, "step": "ready"}],
    "timestamp": "2024-05-01T10:00:02Z", "vm_id": "11111111-2222-3333-4444-555555555555"}


def status_tree(record):
    def setup(tree):
        if record is not None:
            write(os.path.join(tree, 'var/lib/azure-provisioning/state.json'), record)
    return setup


def check_tree(kind):
    def setup(tree):
        from tests import test_check
        os.rmdir(tree)
        if kind == 'empty':
            os.mkdir(tree)
            return
        test_check.good_image(tree)
        if kind == 'agent':
            write(os.path.join(tree, 'usr/sbin/waagent'), '#!/bin/sh\n', 0o755)
            os.makedirs(os.path.join(tree, 'etc/systemd/system/multi-user.target.wants'),
                        exist_ok=True)
            os.symlink('/lib/systemd/system/walinuxagent.service', os.path.join(
                tree, 'etc/systemd/system/multi-user.target.wants/walinuxagent.service'))
        elif kind == 'no-dhcp':
            os.remove(os.path.join(tree, 'etc/systemd/network/20-dhcp.network'))
        elif kind == 'provisioned':
            write(os.path.join(tree, 'var/lib/azure-provisioning/state.json'),
                  json.dumps(GOOD_RECORD))
            write(os.path.join(tree, 'etc/ssh/ssh_host_ed25519_key'), 'key', 0o600)
            write(os.path.join(tree, 'etc/machine-id'), '0123456789abcdef0123456789abcdef\n')
        elif kind == 'old-python':
            shutil.rmtree(os.path.join(tree, 'usr/lib/python3.11'))
    return setup


def deprovision_tree(tree):
    check_tree('provisioned')(tree)
    write(os.path.join(tree, 'var/lib/hyperv/.kvp_pool_1'), b'\0' * 2560)
    write(os.path.join(tree, 'var/lib/dhcp/dhclient.eth0.leases'), 'lease {}\n')
    write(os.path.join(tree, 'var/lib/waagent/CustomData'), 'x')
    write(os.path.join(tree, 'etc/sudoers.d/azure-provisioning'), 'alice ALL=(ALL) ALL\n',
          0o440)
    write(os.path.join(tree, 'etc/passwd'), 'root:x:0:0::/root:/bin/sh\n'
          'alice:x:1000:1000::/home/alice:/bin/bash\n')
    write(os.path.join(tree, 'home/alice/.ssh/authorized_keys'), KEY + '\n', 0o600)


def links_out(tree):
    deprovision_tree(tree)
    os.remove(os.path.join(tree, 'etc/machine-id'))
    os.symlink('/etc/machine-id', os.path.join(tree, 'etc/machine-id'))
    shutil.rmtree(os.path.join(tree, 'var/lib/dhcp'))
    os.symlink('/var/lib/dhcp', os.path.join(tree, 'var/lib/dhcp'))
    shutil.rmtree(os.path.join(tree, 'home/alice'))
    os.symlink('/root', os.path.join(tree, 'home/alice'))
    os.remove(os.path.join(tree, 'etc/passwd'))
    os.symlink('/etc/passwd', os.path.join(tree, 'etc/passwd'))


def scenarios():
    ud = b'#!/bin/sh\necho user data\n'
    cd = base64.b64encode(b'#cloud-config\nhello: custom data\n').decode()
    ovf_password = make_ovf_env('web-7', 'alice', password='Diff-Pa55word!x',
                                disable_ssh_password_auth=False)
    ovf_custom = make_ovf_env('web-7', 'alice', password=None)
    ovf_custom = ovf_custom.replace('</LinuxProvisioningConfigurationSet>',
                                    '<CustomData>%s</CustomData>'
                                    '</LinuxProvisioningConfigurationSet>' % cd)
    S = Scenario
    pu = ['--provision-user', '--timeout', '30']
    return [
        S('success', ['--no-hostname', '--timeout', '30']),
        S('success-verbose', ['--no-hostname', '-v', '--timeout', '30']),
        S('success-rename', ['--timeout', '30'], hostname='image-template'),
        S('dry-run', ['--dry-run', '--timeout', '30'], hostname='image-template'),
        S('dry-run-same-name', ['--dry-run', '--timeout', '30']),
        S('dry-run-provision-user', ['--dry-run'] + pu,
          emulator=dict(admin_username='alice', public_keys=[KEY])),
        S('dry-run-custom-hostname', ['--dry-run', '--timeout', '30'],
          emulator=dict(computer_name='db-01.example')),
        S('invalid-hostname', ['--timeout', '30'], emulator=dict(computer_name='bad_name!')),
        S('invalid-hostname-dry', ['--dry-run', '--timeout', '30'],
          emulator=dict(computer_name='-bad')),
        S('long-hostname', ['--timeout', '30'], emulator=dict(computer_name='a' * 70)),
        S('imds-500', ['--no-hostname', '--timeout', '10'], emulator=dict(imds_faults=[500] * 50)),
        S('imds-404', ['--no-hostname', '--timeout', '10'], emulator=dict(imds_faults=[404] * 50)),
        S('imds-garbage', ['--no-hostname', '--timeout', '10'], emulator=dict(imds_body='{not json')),
        S('imds-json-list', ['--no-hostname', '--timeout', '10'], emulator=dict(imds_body='[1,2]')),
        S('imds-down', ['--no-hostname', '--timeout', '8'], emulator=dict(imds_down=True)),
        S('goalstate-410', ['--no-hostname', '--timeout', '15'],
          emulator=dict(goalstate_faults=[410] * 3)),
        S('goalstate-500-then-ok', ['--no-hostname', '--timeout', '30'],
          emulator=dict(goalstate_faults=[500, 500])),
        S('goalstate-malformed', ['--no-hostname', '--timeout', '10'],
          emulator=dict(goal_state_body='<GoalState><Incarnation>1</Incar')),
        S('goalstate-empty', ['--no-hostname', '--timeout', '10'],
          emulator=dict(goal_state_body='')),
        S('no-role-instance', ['--no-hostname', '--timeout', '15'],
          emulator=dict(no_role_instance_for=100)),
        S('ready-400', ['--no-hostname', '--timeout', '20'], emulator=dict(health_faults=[400])),
        S('ready-410-x10', ['--no-hostname', '--timeout', '20'],
          emulator=dict(health_faults=[410] * 10)),
        S('ready-503-then-ok', ['--no-hostname', '--timeout', '30'],
          emulator=dict(health_faults=[503])),
        S('wireserver-late', ['--no-hostname', '--timeout', '20'],
          emulator=dict(wireserver_up_after=2.0)),
        S('provision-user', pu, emulator=dict(admin_username='alice', public_keys=[KEY]),
          setup=ssh_config),
        S('provision-user-bad-key', pu,
          emulator=dict(admin_username='alice', public_keys=['ssh-rsa not!base64 x'])),
        S('provision-user-bad-name', pu, emulator=dict(admin_username='Bad User;rm')),
        S('provision-user-system', pu, emulator=dict(admin_username='daemon', public_keys=[KEY])),
        S('provision-user-root', pu, emulator=dict(admin_username='root', public_keys=[KEY])),
        S('provision-user-no-keys', pu, emulator=dict(admin_username='alice', public_keys=[])),
        S('no-os-profile', pu, emulator=dict(os_profile=False)),
        S('user-data', ['--no-hostname', '--timeout', '30'], emulator=dict(user_data=ud)),
        S('user-data-empty', ['--no-hostname', '--timeout', '30'], emulator=dict(user_data=b'')),
        S('media-password', ['--provision-user', '--timeout', '30', '--media', 'MEDIA'],
          emulator=dict(admin_username='alice', public_keys=[]), setup=media(ovf_password)),
        S('media-custom-data', ['--timeout', '30', '--media', 'MEDIA', '--no-hostname'],
          setup=media(ovf_custom)),
        S('media-garbage', ['--timeout', '30', '--media', 'MEDIA', '--no-hostname'],
          setup=media('<Environment><not closed')),
        S('media-none', ['--timeout', '30', '--media', 'none', '--no-hostname']),
        S('media-missing-device', ['--timeout', '30', '--media', '/nonexistent/sr9',
                                   '--no-hostname']),
        S('hook-ok', ['--no-hostname', '--timeout', '30'],
          setup=hook('10-ok', '#!/bin/sh\necho hello from hook\necho to-stderr >&2\n')),
        S('hook-fails', ['--no-hostname', '--timeout', '30'],
          setup=hook('10-bad', '#!/bin/sh\necho broken >&2\nexit 3\n')),
        S('hook-control-chars', ['--no-hostname', '--timeout', '30'],
          setup=hook('10-colour', '#!/bin/sh\nprintf \'\\033[31mERROR\\033[0m: disk '
                     '\\007\\000\\014 full\\n\' >&2\nexit 1\n')),
        S('hook-times-out', ['--no-hostname', '--timeout', '8'],
          setup=hook('10-slow', '#!/bin/sh\nsleep 600\n')),
        S('hook-not-executable', ['--no-hostname', '--timeout', '30'],
          setup=hook('10-off', '#!/bin/sh\nexit 1\n', 0o644)),
        S('hook-bad-interpreter', ['--no-hostname', '--timeout', '30'],
          setup=hook('10-nointerp', '#!/nonexistent/interp\n')),
        S('record-dir-readonly', ['--no-hostname', '--timeout', '30'],
          setup=record_dir(0o555)),
        S('record-dir-is-file', ['--no-hostname', '--timeout', '30'],
          setup=record_dir(as_file=True)),
        S('already-provisioned', ['--no-hostname', '--timeout', '30'],
          setup=lambda host: write(os.path.join(host.var_lib, 'azure-provisioning/state.json'),
                                   json.dumps(GOOD_RECORD))),
        S('corrupt-record-provision', ['--no-hostname', '--timeout', '30'],
          setup=lambda host: write(os.path.join(host.var_lib, 'azure-provisioning/state.json'),
                                   '{"result": ')),
        S('kvp-success', ['--no-hostname', '--timeout', '30'], setup=kvp_pool()),
        S('kvp-imds-404', ['--no-hostname', '--timeout', '6'], setup=kvp_pool(),
          emulator=dict(imds_faults=[404] * 50)),
        S('kvp-ready-400', ['--no-hostname', '--timeout', '20'], setup=kvp_pool(),
          emulator=dict(health_faults=[400])),
        S('kvp-hook-fails', ['--no-hostname', '--timeout', '30'],
          setup=kvp_pool(hook('10-bad', '#!/bin/sh\necho broken >&2\nexit 3\n'))),
        S('kvp-dry-run', ['--dry-run', '--timeout', '30'], setup=kvp_pool()),
        S('kvp-pool-is-dir', ['--no-hostname', '--timeout', '30'],
          setup=kvp_pool(lambda host: os.mkdir(os.path.join(host.var_lib,
                                                             'hyperv/.kvp_pool_1')))),
        S('hook-env', ['--no-hostname', '--timeout', '30'], setup=hook('10-env', ENV_HOOK)),
        S('hook-env-user', pu, setup=both(ssh_config, hook('10-env', ENV_HOOK)),
          emulator=dict(admin_username='alice', public_keys=[KEY])),
        S('hook-env-rename', ['--timeout', '30'], hostname='image-template',
          setup=hook('10-env', ENV_HOOK)),
        S('hook-dry-run', ['--dry-run', '--timeout', '30'],
          setup=hook('10-bad', '#!/bin/sh\necho ran >&2\nexit 3\n')),
        S('hooks-two-second-fails', ['--no-hostname', '--timeout', '30'],
          setup=both(hook('10-a', '#!/bin/sh\necho a\n'),
                     hook('20-b', '#!/bin/sh\necho b-out; echo b-err >&2; exit 4\n'),
                     hook('30-c', '#!/bin/sh\necho never\n'))),
        S('hook-long-line', ['--no-hostname', '--timeout', '30'],
          setup=hook('10-long', '#!/bin/sh\nhead -c 20000 /dev/zero | tr "\\0" x; echo\n'
                     'exit 2\n')),
        S('hook-killed', ['--no-hostname', '--timeout', '30'],
          setup=hook('10-kill', '#!/bin/sh\nkill -9 $$\n')),
        S('hook-dir-is-file', ['--no-hostname', '--timeout', '30'],
          setup=lambda host: write(os.path.join(host.etc, 'azure-provisioning/ready.d'), 'x')),
        S('user-exists', pu, setup=both(ssh_config, existing_user),
          emulator=dict(admin_username='alice', public_keys=[KEY])),
        S('user-exists-dry', ['--dry-run'] + pu, setup=both(ssh_config, existing_user),
          emulator=dict(admin_username='alice', public_keys=[KEY])),
        S('user-two-keys', pu, setup=ssh_config,
          emulator=dict(admin_username='alice', public_keys=[KEY, KEY.replace('alice', 'bob')])),
        S('dry-run-imds-404', ['--dry-run', '--timeout', '6'],
          emulator=dict(imds_faults=[404] * 50)),
        S('dry-run-bad-user', ['--dry-run'] + pu, emulator=dict(admin_username='Bad User')),
        S('dry-run-media-password', ['--dry-run', '--provision-user', '--timeout', '30',
                                     '--media', 'MEDIA'],
          emulator=dict(admin_username='alice', public_keys=[]), setup=media(ovf_password)),
        S('timeout-1', ['--no-hostname', '--timeout', '1'], emulator=dict(imds_faults=[503] * 50)),
        S('no-hostname-dry', ['--no-hostname', '--dry-run', '--timeout', '30'],
          emulator=dict(computer_name='other-name')),
        S('no-publish-dry', ['--no-publish-hostname', '--dry-run', '--timeout', '30'],
          hostname='image-template'),
        S('keep-keys', ['--keep-ssh-host-keys', '--no-hostname', '--timeout', '30']),
        S('imds-no-computer-name', ['--timeout', '30'], emulator=dict(computer_name='')),
        S('imds-versions-old', ['--no-hostname', '--timeout', '30'],
          emulator=dict(imds_api_versions=['2019-06-01'])),
        S('ready-reset', ['--no-hostname', '--timeout', '30'],
          emulator=dict(health_faults=['reset'])),
        S('bump-incarnation', ['--no-hostname', '--timeout', '30'],
          emulator=dict(bump_incarnation_after=1)),
        S('rename-hosts-no-entry', ['--timeout', '30'], hostname='image-template',
          setup=hosts_file('127.0.0.1 localhost\n')),
        S('rename-hosts-commented', ['--timeout', '30'], hostname='image-template',
          setup=hosts_file('127.0.0.1 localhost\n#127.0.1.1 image-template\n'
                           '127.0.1.1 image-template image-template.local # mine\n')),
        S('rename-no-etc-hostname', ['--timeout', '30'], hostname='image-template',
          setup=hosts_file('127.0.0.1 localhost\n', hostname_file=False)),
        S('same-name-stale-file', ['--timeout', '30'],
          setup=hosts_file('127.0.0.1 localhost\n', hostname_file='old-name\n')),
        S('rename-fqdn', ['--timeout', '30'], hostname='image-template',
          emulator=dict(computer_name='db-01.example.com')),
        S('rename-uppercase', ['--timeout', '30'], hostname='image-template',
          emulator=dict(computer_name='Web-7')),
        S('rename-hosts-dir', ['--timeout', '30'], hostname='image-template',
          setup=lambda host: (os.remove(os.path.join(host.etc, 'hosts')),
                              os.mkdir(os.path.join(host.etc, 'hosts')))),
        S('imds-no-compute', ['--no-hostname', '--timeout', '10'],
          emulator=dict(imds_body='{"network": {}}')),
        S('imds-vmid-bad', ['--no-hostname', '--timeout', '10'],
          emulator=dict(vm_id='not-a-uuid')),
        S('imds-name-unicode', ['--timeout', '10'], hostname='image-template',
          emulator=dict(computer_name='h\u00e9llo')),
        S('user-data-and-media-custom', ['--timeout', '30', '--media', 'MEDIA', '--no-hostname'],
          setup=media(ovf_custom), emulator=dict(user_data=ud)),
        S('user-uppercase', pu, emulator=dict(admin_username='Alice', public_keys=[KEY])),
        S('user-long-name', pu, emulator=dict(admin_username='a' * 40, public_keys=[KEY])),
        S('user-key-with-options', pu, setup=ssh_config, emulator=dict(
            admin_username='alice', public_keys=['command="/bin/false" ' + KEY])),
        S('imds-429-retry-after', ['--no-hostname', '--timeout', '20'],
          emulator=dict(imds_faults=[('status', 429, {'Retry-After': '1'})])),
        S('imds-503-retry-after-huge', ['--no-hostname', '--timeout', '8'],
          emulator=dict(imds_faults=[('status', 503, {'Retry-After': '99999'})])),
        S('imds-503-retry-after-garbage', ['--no-hostname', '--timeout', '20'],
          emulator=dict(imds_faults=[('status', 503, {'Retry-After': 'soon'})])),
        S('imds-503-retry-after-date', ['--no-hostname', '--timeout', '20'],
          emulator=dict(imds_faults=[('status', 503, {'Retry-After':
                                                      'Wed, 21 Oct 2015 07:28:00 GMT'})])),
        S('goalstate-503-retry-after', ['--no-hostname', '--timeout', '20'],
          emulator=dict(goalstate_faults=[('status', 503, {'Retry-After': '2'})])),
        S('health-503-retry-after', ['--no-hostname', '--timeout', '20'],
          emulator=dict(health_faults=[('status', 503, {'Retry-After': '1'})])),
        S('health-429-retry-after-huge', ['--no-hostname', '--timeout', '10'],
          emulator=dict(health_faults=[('status', 429, {'Retry-After': '3600'})])),
        S('imds-reset', ['--no-hostname', '--timeout', '20'], emulator=dict(imds_faults=['reset'])),
        S('wire-reset-twice', ['--no-hostname', '--timeout', '20'],
          emulator=dict(wire_faults=['reset', 'reset'])),
        S('imds-delay', ['--no-hostname', '--timeout', '20'],
          emulator=dict(imds_faults=[('delay', 3)])),
        S('verbose-imds-404', ['--no-hostname', '-v', '--timeout', '4'],
          emulator=dict(imds_faults=[404] * 50)),
        S('verbose-ready-400', ['--no-hostname', '-v', '--timeout', '20'],
          emulator=dict(health_faults=[400])),
        S('verbose-dry-run', ['--dry-run', '-v', '--timeout', '20']),
        S('verbose-goalstate-410', ['--no-hostname', '-v', '--timeout', '10'],
          emulator=dict(goalstate_faults=[410, 410])),
        S('status-live', ['--status'], kind='cli'),
        S('status-live-json', ['--status', '--json'], kind='cli'),
        S('deprovision-live-dry', ['--deprovision', '--dry-run'], kind='cli'),
        S('status-weird-types', ['--status', '--root', 'TREE'], kind='tree',
          setup=status_tree(json.dumps(dict(GOOD_RECORD, steps='imds', vm_id=5,
                                            timestamp=None, hostname=['x'])))),
        S('status-unknown-result', ['--status', '--root', 'TREE'], kind='tree',
          setup=status_tree(json.dumps(dict(GOOD_RECORD, result='maybe')))),
        S('status-steps-bad', ['--status', '--root', 'TREE'], kind='tree',
          setup=status_tree(json.dumps(dict(GOOD_RECORD, steps=[1, {'step': 'x'},
                                                                {'seconds': 'a'}])))),
        S('status-control-chars', ['--status', '--root', 'TREE'], kind='tree',
          setup=status_tree(json.dumps(dict(GOOD_RECORD, result='failed', step='hooks',
                                            reason='\x1b[31mred\x07\nsecond line')))),
        S('status-huge', ['--status', '--root', 'TREE'], kind='tree',
          setup=status_tree('{"result": "provisioned", "pad": "%s"}' % ('x' * 2000000))),
        S('status-fifo', ['--status', '--root', 'TREE'], kind='tree', timeout=20,
          setup=lambda tree: (os.makedirs(os.path.join(tree, 'var/lib/azure-provisioning')),
                              os.mkfifo(os.path.join(tree, 'var/lib/azure-provisioning/'
                                                           'state.json')))),
        S('status-link-out', ['--status', '--root', 'TREE'], kind='tree',
          setup=lambda tree: (os.makedirs(os.path.join(tree, 'var/lib')),
                              os.symlink('/etc', os.path.join(tree, 'var/lib/'
                                                              'azure-provisioning')))),
        S('deprovision-dry-links-out', ['--deprovision', '--dry-run', '--user', '--root', 'TREE'],
          kind='tree', setup=links_out),
        S('check-links-out', ['--check', '--root', 'TREE'], kind='tree', setup=links_out),
        # usage
        S('help', ['--help'], kind='cli'),
        S('version', ['--version'], kind='cli'),
        S('unknown-option', ['--bogus'], kind='cli'),
        S('positional', ['extra'], kind='cli'),
        S('timeout-garbage', ['--timeout', 'soon'], kind='cli'),
        S('timeout-negative', ['--timeout', '-5'], kind='cli'),
        S('timeout-zero', ['--timeout', '0'], kind='cli'),
        S('timeout-nan', ['--timeout', 'nan'], kind='cli'),
        S('timeout-inf', ['--timeout', 'inf'], kind='cli'),
        S('wireserver-garbage', ['--wireserver', 'not an address', '--dry-run'], kind='cli'),
        S('wireserver-port-huge', ['--wireserver', '127.0.0.1:99999', '--dry-run'], kind='cli'),
        S('imds-hostname', ['--imds', 'example.com', '--dry-run'], kind='cli'),
        S('check-status', ['--check', '--status'], kind='cli'),
        S('status-deprovision', ['--status', '--deprovision'], kind='cli'),
        S('check-timeout', ['--check', '--timeout', '30'], kind='cli'),
        S('check-timeout-default', ['--check', '--timeout', '1200', '--root', 'TREE'],
          kind='tree', setup=check_tree('empty')),
        S('status-no-hostname', ['--status', '--no-hostname'], kind='cli'),
        S('deprovision-verbose', ['--deprovision', '-v'], kind='cli'),
        S('check-dry-run', ['--check', '--dry-run'], kind='cli'),
        S('root-alone', ['--root', '/tmp'], kind='cli'),
        S('user-alone', ['--user'], kind='cli'),
        S('json-check', ['--json', '--check'], kind='cli'),
        S('shown-root-alone', ['--shown-root', '/x'], kind='cli'),
        S('status-root-missing', ['--status', '--root', '/nonexistent-azp'], kind='cli'),
        S('root-is-file', ['--status', '--root', '/etc/hostname'], kind='cli'),
        S('abbrev', ['--stat', '--root', 'TREE'], kind='tree'),
        S('equals-form', ['--status', '--root=TREE'], kind='tree'),
        S('help-with-mode', ['--check', '--help'], kind='cli'),
        S('media-with-check', ['--check', '--media', 'none'], kind='cli'),
        S('provision-user-with-status', ['--status', '--provision-user'], kind='cli'),
        S('keep-keys-with-deprovision', ['--deprovision', '--keep-ssh-host-keys'], kind='cli'),
        S('double-timeout', ['--timeout', '5', '--timeout', 'x'], kind='cli'),
        # --status
        S('status-no-record', ['--status', '--root', 'TREE'], kind='tree'),
        S('status-no-record-json', ['--status', '--json', '--root', 'TREE'], kind='tree'),
        S('status-good', ['--status', '--root', 'TREE'], kind='tree',
          setup=status_tree(json.dumps(GOOD_RECORD))),
        S('status-good-json', ['--status', '--json', '--root', 'TREE'], kind='tree',
          setup=status_tree(json.dumps(GOOD_RECORD))),
        S('status-failed', ['--status', '--root', 'TREE'], kind='tree',
          setup=status_tree(json.dumps(dict(GOOD_RECORD, result='error',
                                            reason='hook 10-x failed', steps=['imds'])))),
        S('status-corrupt', ['--status', '--root', 'TREE'], kind='tree',
          setup=status_tree('{"result": ')),
        S('status-corrupt-json', ['--status', '--json', '--root', 'TREE'], kind='tree',
          setup=status_tree('{"result": ')),
        S('status-list', ['--status', '--root', 'TREE'], kind='tree', setup=status_tree('[1]')),
        S('status-empty-obj', ['--status', '--root', 'TREE'], kind='tree', setup=status_tree('{}')),
        S('status-binary', ['--status', '--root', 'TREE'], kind='tree',
          setup=status_tree(b'\xff\xfe\0garbage')),
        S('status-dir', ['--status', '--root', 'TREE'], kind='tree',
          setup=lambda tree: os.makedirs(os.path.join(
              tree, 'var/lib/azure-provisioning/state.json'))),
        # --check
        S('check-good', ['--check', '--root', 'TREE'], kind='tree', setup=check_tree('good')),
        S('check-empty', ['--check', '--root', 'TREE'], kind='tree', setup=check_tree('empty')),
        S('check-agent', ['--check', '--root', 'TREE'], kind='tree', setup=check_tree('agent')),
        S('check-no-dhcp', ['--check', '--root', 'TREE'], kind='tree',
          setup=check_tree('no-dhcp')),
        S('check-provisioned', ['--check', '--root', 'TREE'], kind='tree',
          setup=check_tree('provisioned')),
        S('check-old-python', ['--check', '--root', 'TREE'], kind='tree',
          setup=check_tree('old-python')),
        S('check-shown-root', ['--check', '--shown-root', '/mnt/img', '--root', 'TREE'],
          kind='tree', setup=check_tree('no-dhcp')),
        # --deprovision
        S('deprovision-dry', ['--deprovision', '--dry-run', '--root', 'TREE'], kind='tree',
          setup=deprovision_tree),
        S('deprovision-dry-user', ['--deprovision', '--dry-run', '--user', '--root', 'TREE'],
          kind='tree', setup=deprovision_tree),
        S('deprovision-dry-empty', ['--deprovision', '--dry-run', '--root', 'TREE'], kind='tree'),
        S('deprovision-real', ['--deprovision', '--root', 'TREE'], kind='tree',
          setup=deprovision_tree, owner=65534),
        S('deprovision-real-not-owner', ['--deprovision', '--root', 'TREE'], kind='tree',
          setup=deprovision_tree),
    ]


# ---------------------------------------------------------------- comparing

def compare(scenario, old_script, new_script, scratch):
    views = []
    for script in (old_script, new_script):
        if 'MEDIA' in scenario.args:
            # the media directory's path must be known before the argv is built
            media_dir = tempfile.mkdtemp(prefix='azp-media-', dir=scratch)
            os.chmod(media_dir, 0o755)
            saved = scenario.args
            scenario.args = [media_dir + '/sr0' if a == 'MEDIA' else a for a in saved]
            setup = scenario.setup

            def moved(host, setup=setup, media_dir=media_dir):
                setup(host)
                shutil.copytree(os.path.join(host.dir, 'tools'), media_dir + '/tools')
                os.rename(os.path.join(media_dir, 'tools', 'sr0'), media_dir + '/sr0')
                host.extra_env['PATH'] = (media_dir + '/tools' + os.pathsep
                                          + os.environ['PATH'])
            scenario.setup = moved
            try:
                view = observe(scenario, script, scratch)
            finally:
                scenario.args, scenario.setup = saved, setup
                shutil.rmtree(media_dir, ignore_errors=True)
            views.append(normalize_media(view, media_dir))
        else:
            views.append(observe(scenario, script, scratch))
    old, new = views
    differences = []
    for aspect in sorted(set(old) | set(new)):
        a, b = old.get(aspect, []), new.get(aspect, [])
        if a != b:
            differences.append((aspect, a, b))
    return differences, old


def normalize_media(view, media_dir):
    return dict((k, [line.replace(media_dir, '<MEDIA>') for line in v]) for k, v in view.items())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--old', required=True, metavar='DIR',
                        help='the checkout of the version to compare with')
    parser.add_argument('--new', default=REPO)
    parser.add_argument('--only', help='comma-separated scenario names')
    parser.add_argument('-v', '--verbose', action='store_true', help='show each run too')
    args = parser.parse_args(argv)
    if not is_root():
        sys.stderr.write('differential: run as root (provisioning runs only inside '
                         'PrivateHost, the rest as nobody)\n')
        return 2
    chosen = scenarios()
    if args.only:
        wanted = args.only.split(',')
        unknown = sorted(set(wanted) - set(s.name for s in chosen))
        if unknown:
            parser.error('no scenario named %s' % ', '.join(unknown))
        chosen = [s for s in chosen if s.name in wanted]
    scratch = tempfile.mkdtemp(prefix='azp-differential-')
    os.chmod(scratch, 0o755)
    found = 0
    try:
        old_script = world_readable_copy(args.old, scratch, 'old')
        new_script = world_readable_copy(args.new, scratch, 'new')
        for scenario in chosen:
            differences, old = compare(scenario, old_script, new_script, scratch)
            print('%-34s %s' % (scenario.name, 'DIFFERS' if differences else 'same'
                                + ' (exit %s)' % old['exit'][0]))
            if args.verbose:
                for aspect, lines in sorted(old.items()):
                    for line in lines:
                        print('      %s | %s' % (aspect, line))
            for aspect, a, b in differences:
                found += 1
                print('  -- %s (--- old, +++ new)' % aspect)
                for line in difflib.unified_diff(a, b, 'old', 'new', lineterm='', n=1):
                    if not line.startswith(('---', '+++')):
                        print('     ' + line)
            sys.stdout.flush()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print('%d scenarios, %d differing aspects' % (len(chosen), found))
    return 1 if found else 0


if __name__ == '__main__':
    sys.exit(main())
