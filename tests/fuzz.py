#!/usr/bin/env python3
"""Mutation fuzzing of azure_provisioning.py's parsers.  Standard library only; Python 3.6+.

    python3 tests/fuzz.py [--cases N] [--seed S] [--only NAME[,NAME...]]
                          [--time-limit-per-case SECONDS] [--max-seconds SECONDS]
                          [--script PATH]
    python3 tests/fuzz.py --seed S --only NAME --replay N [--minimize] [--save FILE]

Each target (the TARGETS table below) is a parser of the script, its seeds (the real
samples in tests/data/ and small built-in ones), how a case is made from a seed, and the
errors the parser is documented to raise.  A case passes when the call returns a value of
the promised kind or raises one of those errors; it fails on any other exception, on a
broken invariant, and on a hang (longer than --time-limit-per-case).

Case N of target T is a function of (seed, T, N) alone: `--replay N` rebuilds it,
shows the input, runs it and prints the traceback; `--minimize` then shrinks the input
while the failure stays the same; `--save FILE` writes the (minimized) input bytes.

How it runs: each target's cases run in a worker process (this file, --worker) that
arms a SIGALRM watchdog around every case, so a hang in Python code is reported with the
place it was stuck.  Some C code never looks at signals (int() of a huge string; the
regex engine before Python 3.11): then the parent, after 2 x the limit + 2 s, asks
the worker for its stacks (faulthandler, SIGUSR1), kills it, counts the hang and starts a
new worker at the next case.  A worker that dies (a crash in C) counts too.  Nothing
leaves the machine: HTTP goes through socket.socketpair(); the DHCP readers read a file
tree in a temporary directory of ours.  Replay with the Python that found the failure.

Printed: the seed first, then per target the cases run, how they ended, the seconds, and
each class of failure (exception type and where in the script) with the number of cases,
the first case's message and its replay command.  Exit status 1 when any target had a
failure, 2 on a usage error, else 0.
"""

import argparse
import base64
import importlib.util
import json
import os
import random
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DATA = os.path.join(HERE, 'data')
SCRIPT = os.path.join(REPO, 'azure_provisioning.py')

MAX_INPUT = 1200000         # bytes; a little over the script's MAX_RESPONSE_BYTES (1 MiB)
STARTUP_GRACE = 15.0        # seconds a new worker may take before its first answer

ap = None                   # the script under test, loaded by load_script()


def load_script(path=SCRIPT):
    global ap
    spec = importlib.util.spec_from_file_location('azure_provisioning', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ap = module
    return module


# --------------------------------------------------------------------------
# Seeds
# --------------------------------------------------------------------------

def data_files(suffix):
    return [read_data(name) for name in sorted(os.listdir(DATA)) if name.endswith(suffix)]


def read_data(name):
    with open(os.path.join(DATA, name), 'rb') as f:
        return f.read()


def ssh_string(data):
    return struct.pack('>I', len(data)) + data


def key_line(kind, fields, comment=b''):
    """A well-formed public key line: the blob names its type, then the type's fields
    (made-up numbers: the script checks the format, not the mathematics)."""
    blob = ssh_string(kind) + b''.join(ssh_string(field) for field in fields)
    return b' '.join([kind, base64.b64encode(blob)] + ([comment] if comment else []))


def filler(size, start=1):
    return bytes((start + 37 * i) % 256 for i in range(size))


def ssh_key_seeds():
    point = {256: 65, 384: 97, 521: 133}
    keys = [key_line(b'ssh-rsa', [b'\x01\x00\x01', b'\x00\xc3' + filler(383)], b'alice@laptop'),
            key_line(b'ssh-rsa', [b'\x03', b'\x00\xb1' + filler(255, 9)], b'old 2048-bit key'),
            key_line(b'ssh-ed25519', [filler(32)], b'bob@work'),
            key_line(b'ssh-ed25519', [filler(32, 5)])]
    for bits, size in sorted(point.items()):
        kind = b'ecdsa-sha2-nistp%d' % bits
        keys.append(key_line(kind, [b'nistp%d' % bits, b'\x04' + filler(size - 1, bits)],
                             b'carol@ci'))
    keys.append(key_line(b'sk-ssh-ed25519@openssh.com', [filler(32, 3), b'ssh:'], b'yubikey'))
    keys.append(key_line(b'sk-ecdsa-sha2-nistp256@openssh.com',
                         [b'nistp256', b'\x04' + filler(64, 7), b'ssh:'], b'token'))
    # as IMDS hands them over: a CRLF at the end, tabs
    keys.append(keys[2].replace(b' ', b'\t') + b'\r\n')
    return keys


def http_seeds():
    goal_state = read_data('walinuxagent__GoalState-incarnation-3.xml')
    instance = read_data('azure-docs__imds-full-instance-response-linux.json')
    imds_error = read_data('azure-docs__imds-error-missing-api-version.json')
    wire = (b'Content-Type: text/xml; charset=utf-8\r\nServer: Microsoft-IIS/10.0\r\n'
            b'x-ms-version: 2012-11-30\r\nDate: Mon, 01 Jul 2024 10:00:00 GMT\r\n')
    imds = b'Content-Type: application/json; charset=utf-8\r\nServer: IMDS/150.870.65.1325\r\n'

    def plain(status, headers, body):
        return (b'HTTP/1.1 ' + status + b'\r\n' + headers
                + b'Content-Length: %d\r\n\r\n' % len(body) + body)

    def chunked(headers, body, sizes, extensions=(), trailers=b''):
        out, at, i = [], 0, 0
        while at < len(body):
            size = sizes[i % len(sizes)]
            extension = extensions[i % len(extensions)] if extensions else b''
            out.append(b'%x%s\r\n%s\r\n' % (len(body[at:at + size]), extension,
                                            body[at:at + size]))
            at, i = at + size, i + 1
        return (b'HTTP/1.1 200 OK\r\n' + headers + b'Transfer-Encoding: chunked\r\n\r\n'
                + b''.join(out) + b'0\r\n' + trailers + b'\r\n')

    return [
        plain(b'200 OK', wire, goal_state),
        plain(b'200 OK', imds, instance),
        chunked(wire, goal_state, [1, 17, 300, 4096], [b'', b';name=value', b' ;x="a b"']),
        chunked(imds, instance, [1000], (), b'X-Checksum: 1234\r\nX-Trailer: done\r\n'),
        b'HTTP/1.1 100 Continue\r\n\r\n' + plain(b'200 OK', wire, goal_state),
        b'HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\n\r\n' + plain(b'201 Created',
                                                                              wire, b''),
        b'HTTP/1.1 204 No Content\r\nDate: Mon, 01 Jul 2024 10:00:00 GMT\r\n\r\n',
        b'HTTP/1.1 304 Not Modified\r\nContent-Length: 1234\r\nETag: "x"\r\n\r\n',
        b'HTTP/1.1 200 OK\r\nConnection: close\r\n' + imds + b'\r\n' + instance,
        b'HTTP/1.0 200 OK\r\n\r\n' + goal_state,
        plain(b'400 Bad Request', imds, imds_error),
        plain(b'410 Gone', wire, b''),
        plain(b'503 Service Unavailable', b'Retry-After: 2\r\n', b'busy'),
    ]


def hosts_seeds():
    debian = (b'127.0.0.1\tlocalhost\n'
              b'127.0.1.1\timage-template.example.com\timage-template\n\n'
              b'# The following lines are desirable for IPv6 capable hosts\n'
              b'::1     localhost ip6-localhost ip6-loopback\n'
              b'ff02::1 ip6-allnodes\nff02::2 ip6-allrouters\n')
    rhel = (b'127.0.0.1   localhost localhost.localdomain localhost4 localhost4.localdomain4\n'
            b'::1         localhost localhost.localdomain localhost6 localhost6.localdomain6\n')
    added = rhel + b'10.0.0.4    image-template image-template.internal.cloudapp.net  # added\n'
    return [debian, rhel, added]


NETWORK_FILE = b'''[Match]
Name=eth0

[Network]
DHCP=yes

[DHCPv4]
SendHostname=yes
UseDomains=true
'''

NETWORK_FILES = [
    NETWORK_FILE,
    b'[Match]\nName=en* eth*\n\n[Network]\nDHCP=ipv4\nLinkLocalAddressing=no\n\n'
    b'[DHCP]\nHostname=image-template\nRouteMetric=100\n',
    b'# 80-container-host0.network\n[Match]\nVirtualization=container\nName=host0\n\n'
    b'[Network]\nDHCP=yes\n; comment\nLinkLocalAddressing=yes\n\n[DHCPv4]\nSendHostname=no\n',
    b'[DHCPv4]\nSendHostname = yes\nHostname=web-7\n',
]

LINK_STATE = b'''# This is private data. Do not parse.
ADMIN_STATE=configured
OPER_STATE=routable
CARRIER_STATE=carrier
ADDRESS_STATE=routable
ONLINE_STATE=online
REQUIRED_FOR_ONLINE=yes
NETWORK_FILE=/etc/systemd/network/10-eth0.network
NETWORK_FILE_DROPINS="/etc/systemd/network/10-eth0.network.d/50-hostname.conf"
DNS=168.63.129.16
DHCP4_ADDRESS=10.0.0.4
DHCP_LEASE=/run/systemd/netif/leases/2
'''


def networkd_seeds():
    """File trees under a root directory, as networkd_plan reads them."""
    return [{'sys/class/net/eth0/ifindex': b'2\n',
             'run/systemd/netif/links/2': LINK_STATE,
             'etc/systemd/network/10-eth0.network': NETWORK_FILES[0],
             'etc/systemd/network/10-eth0.network.d/50-hostname.conf':
                 b'[DHCPv4]\nSendHostname=yes\nHostname=image-template\n'},
            {'sys/class/net/eth0/ifindex': b'3\n',
             'run/systemd/netif/links/3':
                 LINK_STATE.replace(b'/etc/systemd/network/10-eth0.network', b'/usr/lib/'
                                    b'systemd/network/99-default.network').replace(
                     b'NETWORK_FILE_DROPINS="/usr/lib/systemd/network/99-default.network.d/'
                     b'50-hostname.conf"', b'NETWORK_FILE_DROPINS=""'),
             'usr/lib/systemd/network/99-default.network': NETWORK_FILES[1]}]


# which file of a tree a case mutates, with weights: mostly the configuration an image
# maker writes; sometimes the files the kernel or networkd write (less likely wrong)
NETWORKD_FILES = [('etc/systemd/network/10-eth0.network', 5),
                  ('usr/lib/systemd/network/99-default.network', 5),
                  ('etc/systemd/network/10-eth0.network.d/50-hostname.conf', 2),
                  ('run/systemd/netif/links/2', 2), ('run/systemd/netif/links/3', 2),
                  ('sys/class/net/eth0/ifindex', 1)]

DHCLIENT_CONF = b'''# Configuration file for /sbin/dhclient.
#
# This is a sample configuration file for dhclient. See dhclient.conf's
#\tman page for more information about the syntax of this file.

option rfc3442-classless-static-routes code 121 = array of unsigned integer 8;

send host-name = gethostname();
request subnet-mask, broadcast-address, time-offset, routers,
\tdomain-name, domain-name-servers, domain-search, host-name,
\tdhcp6.name-servers, dhcp6.domain-search, dhcp6.fqdn, dhcp6.sntp-servers,
\tnetbios-name-servers, netbios-scope, interface-mtu,
\trfc3442-classless-static-routes, ntp-servers;

#send dhcp-client-identifier 1:0:a0:24:ab:fb:9c;
#supersede domain-name "fugue.com home.vix.com";
timeout 300;

#lease {
#  interface "eth0";
#  option host-name "andare.swiftmud.com";
#}
'''


def dhclient_seeds():
    return [{'proc/1/cmdline': b'dhclient\0-cf\0/etc/dhcp/dhclient.conf\0eth0\0',
             'etc/dhcp/dhclient.conf': DHCLIENT_CONF},
            {'proc/1/cmdline': b'/sbin/dhclient\0-4\0-v\0-i\0-pf\0/run/dhclient.eth0.pid\0-lf\0'
                               b'/var/lib/dhcp/dhclient.eth0.leases\0-I\0eth0\0',
             'etc/dhcp/dhclient.conf':
                 b'interface "eth0" {\n  send host-name "image-template";\n'
                 b'  request subnet-mask, routers;\n}\n'},
            {'proc/1/cmdline': b'dhclient\0-cf\0/etc/dhcp/dhclient.conf\0eth0\0',
             'etc/dhcp/dhclient.conf': b'timeout 300;\n'}]


DHCLIENT_FILES = [('etc/dhcp/dhclient.conf', 8), ('proc/1/cmdline', 2)]


def imds_seeds():
    key = ssh_key_seeds()[2].decode()
    built_in = {'compute': {
        'name': 'image-template', 'vmId': '02aab8a4-74ef-476e-8182-f6d2ba4166a6',
        'osProfile': {'computerName': 'web-7', 'adminUsername': 'azureuser',
                      'disablePasswordAuthentication': 'true'},
        'publicKeys': [{'keyData': key + '\r\n', 'path': '/home/azureuser/.ssh/authorized_keys'},
                       {'keyData': key, 'path': '/home/azureuser/.ssh/authorized_keys'}]},
        'network': {'interface': []}}
    return data_files('.json') + [json.dumps(built_in, indent=2).encode()]


def imds_field_seeds():
    return [seed for seed in imds_seeds() if b'"compute"' in seed]


# --------------------------------------------------------------------------
# Interesting tokens
# --------------------------------------------------------------------------

def runs(chars, sizes=(256, 4096, 65536)):
    return [c * n for c in chars for n in sizes]


COMMON_TOKENS = [
    b'\x00', b'\x1b', b'\x1b[2J', b'\r', b'\n', b'\r\n', b'\t', b'\x0b', b'\x0c', b'\x1c', b'\x7f',
    '\ufffe'.encode(), '\ufeff'.encode(), '\u2028'.encode(), '\x85'.encode(), '\u0662'.encode(),
    '\u00b2'.encode(), '\u3000'.encode(), b'\xff', b'\xfe\xff', b'\xc0\x80', b'\xed\xa0\x80',
    b'\xf4\x90\x80\x80', b'0', b'-1', b'4294967296', b'18446744073709551617', b'9' * 5000,
    b'1e999999', b'NaN', b'%s%n', b'A' * 100000, b' ' * 100000,
] + runs([b'A', b' ', b'\n', b'\x00'])

XML_TOKENS = [
    b'<?xml version="1.0" encoding="utf-Z"?>', b'<?xml version="1.0" encoding="utf-16"?>',
    b'<?xml version="1.0" encoding="latin-1"?>', b'<?xml version="2.0"?>',
    b'<!DOCTYPE GoalState [<!ENTITY a "aaaa">]>', b'<!DOCTYPE GoalState SYSTEM "file:///x">',
    b'<!DOCTYPE', b'<!ENTITY', b'&#0;', b'&#x110000;', b'&a;', b'&amp;', b'&lt;', b'&#65;',
    b'<![CDATA[x]]>', b'<?pi x?>', b'<!-- c -->', b'xmlns="urn:x"', b'<x:GoalState xmlns:x="u">',
    b'<GoalState>', b'</GoalState>', b'<Incarnation>', b'</Incarnation>', b'<Container>',
    b'<ContainerId>', b'<RoleInstanceList>', b'<RoleInstance>', b'<InstanceId>', b'>', b'<',
    '<Incarnation>\u0661\u0662</Incarnation>'.encode(), b'<Incarnation>99999999999999999999',
    b'<a>' * 100000, b'<a/>' * 100000, b'<a b="' + b'c' * 100000 + b'"/>',
]

JSON_TOKENS = [
    b'[' * 100000, b'{"a":' * 50000, b'[' * 1000, b'"\\u0000"', b'"\\ud800"', b'"\\udc00\\ud800"',
    b'null', b'true', b'false', b'1e400', b'-', b'-0', b'Infinity', b'-Infinity', b'NaN', b'{}',
    b'[]', b'{"compute":', b'"compute"', b'"osProfile"', b'"computerName"', b'"name"', b'":"',
    b'"adminUsername"', b'"publicKeys"', b'"keyData"', b'"vmId"', b',', b':', b'"', b'\\',
    b'\\u', b'\\uZZZZ', b'"' + b'x' * 100000 + b'"', b'1' * 5000, b'0.' + b'1' * 5000,
]

HTTP_TOKENS = [
    b'HTTP/1.1 ', b'HTTP/1.0 ', b'HTTP/2 ', b'HTTP/1.1 100 Continue\r\n\r\n',
    b'HTTP/1.1 200 OK\r\n', b'HTTP/1.1 204 No Content\r\n', b'HTTP/1.1 304 Not Modified\r\n',
    b'Content-Length: ', b'Content-Length: 0\r\n', b'Content-Length: 1048577\r\n',
    b'Content-Length: 99999999999999999999\r\n', b'Content-Length: -1\r\n',
    b'Content-Length: 5, 5\r\n', '\u00b2'.encode('latin-1'), b'Transfer-Encoding: chunked\r\n',
    b'Transfer-Encoding: gzip, chunked\r\n', b'Connection: close\r\n', b' folded\r\n',
    b'\r\n\r\n', b'0\r\n\r\n', b'\r\n0\r\n\r\n', b'ffffffff\r\n', b'ffffffffffffffff\r\n',
    b';ext=1', b';' * 1000, b'-5\r\n', b'0x10\r\n', b' 1 \r\n', b'100000\r\n',
    b'X: ' + b'y' * 70000 + b'\r\n', b'X: y\r\n' * 1000, b'1\r\na\r\n' * 20000,
]

HOSTS_TOKENS = [
    b'127.0.0.1', b'::1', b'127.0.1.1', b'0.0.0.0', b'localhost', b'localhost.localdomain',
    b'image-template', b'image-template.', b'image-template.example.com', b'IMAGE-TEMPLATE',
    b'debian', b'#', b' # ', b'\t', b' ', '\u00a0'.encode(), '\u2029'.encode(),
]

INI_TOKENS = [
    b'[Network]', b'[DHCPv4]', b'[DHCP]', b'[Match]', b'DHCP=yes', b'SendHostname=no',
    b'SendHostname=', b'Hostname=', b'Hostname=image-template', b'=', b'==', b'#', b';',
    b'[', b']', b'[]', b'\\\n', b'"',
]

DHCLIENT_TOKENS = [
    b'send host-name = gethostname();', b'send host-name "x";', b'send', b'host-name',
    b'gethostname()', b';', b'#', b'{', b'}', b'"', b'interface "eth0"',
    b'\n' * 100000, b' ' * 100000, b'\nsend ' * 10000, b'send host-name ' * 10000,
]

PATH_TOKENS = [  # for the files networkd and the kernel write, and dhclient's command line
    b'\x00', b'-cf', b'-x', b'-r', b'eth0', b'/', b'/..', b'NETWORK_FILE=', b'NETWORK_FILE=/',
    b'NETWORK_FILE_DROPINS="', b'"', b'A' * 5000, b'/' * 5000, b'2', b'\n',
]

SSH_TOKENS = [
    b'ssh-rsa', b'ssh-ed25519', b'ecdsa-sha2-nistp256', b'sk-ssh-ed25519@openssh.com',
    b'ssh-dss', b'AAAA', b'AAAAC3NzaC1lZDI1NTE5', b'=', b'==', b'===', b'+', b'/', b'-', b'_',
    b' ', b'\t', 'é'.encode(), b'command="x" ', b'\n', b'\r', '\u2028'.encode(),
]

SSH_BLOB_TOKENS = [
    b'\x00\x00\x00\x00', b'\xff\xff\xff\xff', b'\x7f\xff\xff\xff', b'\x00\x00\x00\x07ssh-rsa',
    b'\x00\x00\x00\x0bssh-ed25519', b'\x00\x00\x00\x0bssh-ED25519', b'\x00\x00\x00',
    'é'.encode(), b'\x80',
]

DELIMITERS = [b'\n', b'\r\n', b'<', b'>', b'"', b':', b' ', b'=', b'\0', b'[', b'{', b',', b';']


# --------------------------------------------------------------------------
# Mutations
# --------------------------------------------------------------------------

def position(rng, data):
    """An offset in data: uniform, or next to a delimiter (where structure is)."""
    if data and rng.random() < 0.5:
        delimiter = rng.choice(DELIMITERS)
        at = data.find(delimiter, rng.randrange(len(data)))
        if at >= 0:
            return at + len(delimiter) if rng.random() < 0.5 else at
    return rng.randrange(len(data) + 1)


def span(rng, data, start):
    room = len(data) - start
    if room <= 0:
        return 0
    return min(room, 1 + rng.randrange(16)) if rng.random() < 0.8 else 1 + rng.randrange(room)


def flip_bit(rng, data, donors, tokens):
    if not data:
        return data
    i = rng.randrange(len(data))
    return data[:i] + bytes([data[i] ^ (1 << rng.randrange(8))]) + data[i + 1:]


def set_byte(rng, data, donors, tokens):
    if not data:
        return data
    i = rng.randrange(len(data))
    value = rng.choice([0, 0x7f, 0x80, 0xff, 0x20, 0x0a, 0x0d, rng.randrange(256)])
    return data[:i] + bytes([value]) + data[i + 1:]


def insert_bytes(rng, data, donors, tokens):
    i = position(rng, data)
    return data[:i] + bytes(rng.randrange(256) for _ in range(1 + rng.randrange(8))) + data[i:]


def delete_range(rng, data, donors, tokens):
    i = position(rng, data)
    return data[:i] + data[i + span(rng, data, i):]


def duplicate_range(rng, data, donors, tokens):
    i = position(rng, data)
    piece = data[i:i + span(rng, data, i)]
    times = 1 if rng.random() < 0.8 else rng.choice([2, 10, 100, 1000, 10000])
    times = max(1, min(times, MAX_INPUT // max(1, len(piece))))
    at = position(rng, data)
    return data[:at] + piece * times + data[at:]


def splice(rng, data, donors, tokens):
    other = rng.choice(donors)
    i, j = position(rng, data), position(rng, other)
    if rng.random() < 0.5:
        return data[:i] + other[j:]
    return data[:i] + other[j:j + span(rng, other, j)] + data[i:]


def insert_token(rng, data, donors, tokens):
    i = position(rng, data)
    return data[:i] + rng.choice(tokens) + data[i:]


def replace_with_token(rng, data, donors, tokens):
    i = position(rng, data)
    return data[:i] + rng.choice(tokens) + data[i + span(rng, data, i):]


def truncate(rng, data, donors, tokens):
    return data[:position(rng, data)]


MUTATORS = [flip_bit, set_byte, insert_bytes, delete_range, duplicate_range, splice,
            insert_token, insert_token, replace_with_token, truncate]


def mutate(rng, data, donors, tokens, notes=None):
    """1 to 8 stacked byte-level mutations (mostly few)."""
    tokens = tokens + COMMON_TOKENS
    for _ in range(rng.choice([1, 1, 1, 2, 2, 3, 4, 6, 8])):
        mutator = rng.choice(MUTATORS)
        data = mutator(rng, data, donors, tokens)[:MAX_INPUT]
        if notes is not None:
            notes.append(mutator.__name__)
    return data


# JSON at the value level: the document stays valid JSON, a value in it changes (to reach
# past the parser).  Raw JSON text, so that nesting deeper than json.dumps can write fits.
JSON_VALUES = [
    'null', 'true', 'false', '0', '-0', '1', '-1', '1.5', '1e999', '-1e999', 'NaN', 'Infinity',
    '9' * 5000, '9' * 30, '""', '" "', '"web-7"', '"WEB-7"', '"web-7."', '".web"', '"web..7"',
    '"-web"', '"web-"', '"a\\u0000b"', '"\\u0000"', '"\\ud800"', '"\\u00e9t\\u00e9"',
    '"\\u0661\\u0662"', '"%s"' % ('a' * 63), '"%s"' % ('a' * 64), '"%s"' % '.'.join(['a' * 63] * 4),
    '"%s"' % ('x' * 100000), '"line1\\nline2"', '"true"', '"false"', '"root"', '"_"', '"-x"',
    '"0day"', '"a b"', '"A"', '[]', '{}', '[null]', '[{}]', '[[]]', '[{"keyData": null}]',
    '[{"keyData": 1, "path": 2}]', '{"keyData": "x"}', '["ssh-rsa AAAA"]',
    '[' * 100 + ']' * 100, '[' * 1000 + ']' * 1000, '[' * 100000 + ']' * 100000,
    '{"a":' * 1000 + 'null' + '}' * 1000, '{"a":' * 50000 + 'null' + '}' * 50000,
]

FAVOURED_PATHS = [
    (), ('compute',), ('compute', 'osProfile'), ('compute', 'osProfile', 'computerName'),
    ('compute', 'name'), ('compute', 'osProfile', 'adminUsername'), ('compute', 'vmId'),
    ('compute', 'osProfile', 'disablePasswordAuthentication'), ('compute', 'publicKeys'),
    ('compute', 'publicKeys', 0), ('compute', 'publicKeys', 0, 'keyData'),
    ('compute', 'publicKeys', 1, 'keyData'), ('compute', 'publicKeys', 0, 'path'),
]

SENTINEL = '\x01fuzz\x01'


def json_paths(document, limit=500):
    paths, stack = [], [((), document)]
    while stack and len(paths) < limit:
        path, node = stack.pop()
        paths.append(path)
        if isinstance(node, dict):
            stack.extend((path + (key,), value) for key, value in node.items())
        elif isinstance(node, list):
            stack.extend((path + (i,), value) for i, value in enumerate(node))
    return paths


def settable(document, path):
    """True when path's parent exists (a dict, or a list holding the index)."""
    node = document
    for step in path[:-1]:
        if isinstance(node, dict) and step in node:
            node = node[step]
        elif isinstance(node, list) and isinstance(step, int) and step < len(node):
            node = node[step]
        else:
            return False
    last = path[-1] if path else None
    return (not path or isinstance(node, dict) and isinstance(last, str)
            or isinstance(node, list) and isinstance(last, int) and last < len(node))


def mutate_json_values(rng, data, rounds, notes=None, paths=FAVOURED_PATHS):
    for _ in range(rounds):
        try:
            document = json.loads(data.decode('utf-8'))
        except Exception:       # not JSON (any more), or nested too deep to load
            return data
        favoured = [p for p in paths if settable(document, p)]
        path = rng.choice(favoured if favoured and rng.random() < 0.7
                          else json_paths(document))
        raw = rng.choice(JSON_VALUES)
        if notes is not None:
            notes.append('%s=%s' % ('.'.join(map(str, path)) or '(document)', raw[:20]))
        if not path:
            data = raw.encode()
            continue
        node = document
        for step in path[:-1]:
            node = node[step]
        node[path[-1]] = SENTINEL
        ascii_only = rng.random() < 0.5
        indent = rng.choice([None, 2])
        try:
            text = json.dumps(document, ensure_ascii=ascii_only, indent=indent)
        except RecursionError:  # loads took it, dumps may not (3.12): keep it as it is
            return data
        text = text.replace(json.dumps(SENTINEL, ensure_ascii=ascii_only), raw, 1)
        data = text.encode('utf-8', 'surrogatepass')
    return data


# --------------------------------------------------------------------------
# Cases: how each target makes one from a seed
# --------------------------------------------------------------------------

class Case(object):
    def __init__(self, data, params=None, notes=None):
        self.data = data            # the mutated bytes (what --minimize shrinks)
        self.params = params or {}  # the rest of the call: decoding, names, ...
        self.notes = notes or []    # the mutations applied

    def with_data(self, data):
        return Case(data, self.params, self.notes)


def choose_params(rng, choices):
    return dict((name, rng.choice(values)) for name, values in choices)


def bytes_case(tokens, *choices):
    """Byte-level mutation of a seed, plus a choice from each (name, values)."""
    def make(rng, seed, donors, mutated):
        notes = []
        data = mutate(rng, seed, donors, tokens, notes) if mutated else seed
        return Case(data, choose_params(rng, choices), notes)
    return make


DECODINGS = ('decode', ['surrogateescape', 'replace'])


XML_DECLARATIONS = [
    b'<?xml version="1.0" encoding="utf-Z"?>', b'<?xml version="1.0" encoding="utf-16"?>',
    b'<?xml version="1.0" encoding="utf-32"?>', b'<?xml version="1.0" encoding="latin-1"?>',
    b'<?xml version="1.0" encoding="cp1252"?>', b'<?xml version="1.0" encoding="shift_jis"?>',
    b'<?xml version="1.0" encoding="idna"?>', b'<?xml version="1.0" encoding="rot13"?>',
    b'<?xml version="1.0" encoding="base64"?>', b'<?xml version="1.0" encoding=""?>',
    b'<?xml version="1.0" encoding="%s"?>' % (b'x' * 1000), b'<?xml version="2.0"?>',
    b'<?xml version="1.0" standalone="yes"?>', b'\xef\xbb\xbf<?xml version="1.0"?>',
]


def goal_state_case(rng, seed, donors, mutated):
    """Byte-level mutations; sometimes first another XML declaration (its encoding=)."""
    notes, data = [], seed
    if mutated and rng.random() < 0.2:
        data = rng.choice(XML_DECLARATIONS) + re.sub(rb'^\s*<\?xml[^>]*\?>', b'', data)
        notes.append('declaration')
    if mutated and (not notes or rng.random() < 0.7):
        data = mutate(rng, data, donors, XML_TOKENS, notes)
    return Case(data, choose_params(rng, [DECODINGS]), notes)


def http_case(rng, seed, donors, mutated):
    notes = []
    data = mutate(rng, seed, donors, HTTP_TOKENS, notes) if mutated else seed
    cuts = sorted(rng.randrange(len(data) + 1) for _ in range(rng.randrange(5)))
    pause = 0.001 if rng.random() < 0.2 else 0.0
    return Case(data, {'cuts': cuts, 'pause': pause}, notes)


def imds_case(rng, seed, donors, mutated):
    """Byte-level and value-level mutations of an instance document."""
    notes, data = [], seed
    if mutated:
        if rng.random() < 0.5:
            data = mutate_json_values(rng, data, 1 + rng.randrange(3), notes)
        if data == seed or rng.random() < 0.5:
            data = mutate(rng, data, donors, JSON_TOKENS, notes)
    return Case(data, choose_params(rng, [DECODINGS]), notes)


def imds_value_case(rng, seed, donors, mutated):
    """Value-level only, below "compute": the document mostly still parses."""
    notes = []
    data = (mutate_json_values(rng, seed, 1 + rng.randrange(4), notes, FAVOURED_PATHS[2:])
            if mutated else seed)
    return Case(data, choose_params(rng, [DECODINGS, ('call', ['hostname', 'user', 'vmId'])]),
                notes)


def ssh_key_case(rng, seed, donors, mutated):
    """Byte-level on the line, or on the decoded blob (to reach past base64)."""
    notes, data = [], seed
    if mutated and rng.random() < 0.5:
        kind, body, comment = (seed.split(None, 2) + [b''])[:3]
        blobs = [base64.b64decode(d.split()[1]) for d in donors]
        blob = mutate(rng, base64.b64decode(body), blobs, SSH_BLOB_TOKENS, notes)
        if rng.random() < 0.3:
            kind = rng.choice(donors).split()[0]
        data = b' '.join([kind, base64.b64encode(blob), comment])
    if mutated and (data == seed or rng.random() < 0.4):
        data = mutate(rng, data, donors, SSH_TOKENS, notes)
    return Case(data, choose_params(rng, [DECODINGS]), notes)


def tree_case(files, tokens):
    """Mutate one file of a seed tree (chosen by weight among those it has)."""
    def make(rng, tree, donors, mutated):
        present = [(path, weight) for path, weight in files if path in tree]
        path = rng.choice([path for path, weight in present for _ in range(weight)])
        notes, data = [], tree[path]
        if mutated:
            others = [t[p] for t in donors for p, _ in files if p in t]
            data = mutate(rng, data, others, tokens + PATH_TOKENS, notes)
        return Case(data, {'tree': tree, 'file': path}, notes)
    return make


# --------------------------------------------------------------------------
# Calls and their invariants
# --------------------------------------------------------------------------

class Violation(Exception):
    """The call returned, but not what it promises.  kind names the class of failure."""

    def __init__(self, kind, detail=''):
        Exception.__init__(self, '%s: %s' % (kind, detail) if detail else kind)
        self.kind = kind


class NotReached(Exception):
    """The case did not get to the function under test (e.g. unparsable document)."""


def check(condition, kind, detail=''):
    if not condition:
        raise Violation(kind, detail)


def text_of(case):
    return case.data.decode('utf-8', case.params.get('decode', 'replace'))


def call_http(case):
    cuts = [cut for cut in case.params['cuts'] if cut <= len(case.data)]
    pieces = [case.data[a:b] for a, b in zip([0] + cuts, cuts + [len(case.data)])]
    ours, theirs = socket.socketpair()      # AF_UNIX: nothing leaves the machine

    def write():
        try:
            for i, piece in enumerate(pieces):
                if i and case.params['pause']:
                    time.sleep(case.params['pause'])
                ours.sendall(piece)
            ours.shutdown(socket.SHUT_WR)
        except OSError:     # the reader stopped reading and closed its end
            pass

    writer = threading.Thread(target=write)
    writer.daemon = True
    writer.start()
    try:
        response = ap.read_response(theirs, ap.Deadline(5))
    finally:
        theirs.close()
        writer.join(5)
        ours.close()
    check(isinstance(response, ap.Response), 'returned a %s, not a Response'
          % type(response).__name__)
    check(isinstance(response.status, int) and 200 <= response.status <= 999,
          'returned an interim or invalid status', repr(response.status))
    check(isinstance(response.body, bytes) and len(response.body) <= ap.MAX_RESPONSE_BYTES,
          'body not bytes or larger than MAX_RESPONSE_BYTES', '%d bytes' % len(response.body))
    check(response.status not in (204, 304) or response.body == b'',
          '%d answer with a body' % response.status, repr(response.body[:40]))
    check(isinstance(response.headers, dict)
          and all(isinstance(v, str) for v in response.headers.values()),
          'headers not a dict of str')


def call_goal_state(case):
    state = ap.parse_goal_state(text_of(case))
    if state is not None:
        check(isinstance(state, ap.GoalState), 'returned a %s, not a GoalState'
              % type(state).__name__)
        for field in ('incarnation', 'container_id', 'instance_id'):
            check(isinstance(getattr(state, field), str) and getattr(state, field),
                  'GoalState.%s empty or not a str' % field)


def call_ovf_env(case):
    media = ap.parse_ovf_env(case.data, '/dev/sr0')
    check(isinstance(media, ap.OvfEnv), 'returned a %s, not an OvfEnv' % type(media).__name__)
    for field in ('hostname', 'username', 'disable_password_auth', 'provision_agent'):
        check(isinstance(getattr(media, field), str), 'OvfEnv.%s is not a str' % field)
    check(media.password is None or (isinstance(media.password, str) and media.password),
          'OvfEnv.password is neither None nor a non-empty str')
    check(media.custom_data is None or isinstance(media.custom_data, bytes),
          'OvfEnv.custom_data is neither None nor bytes')
    check(all(isinstance(p, str) and isinstance(v, str) for p, v in media.public_keys),
          'a public key is not a (str, str) pair')
    if media.password:
        check(media.password not in repr(media), 'repr(OvfEnv) shows the password')


def parse_instance_document(text):
    """ap.parse_instance_document when the script has one; else what today's
    fetch_instance_metadata does: parse_json, then a dict with a "compute" object
    (it takes AttributeError there for "not an object": a ValueError here)."""
    if hasattr(ap, 'parse_instance_document'):
        return ap.parse_instance_document(text)
    document = ap.parse_json(text)
    try:
        compute = document.get('compute')
    except AttributeError:
        raise ValueError('not a JSON object')
    if not isinstance(compute, dict):
        raise ValueError('no "compute" object')
    return document


def call_imds(case):
    document = parse_instance_document(text_of(case))
    check(isinstance(document, dict) and isinstance(document.get('compute'), dict),
          'returned something that is not a dict with a "compute" dict')


def call_imds_fields(case):
    try:
        document = parse_instance_document(text_of(case))
    except Exception:       # the imds target reports the parser's own failures
        raise NotReached()
    call = case.params['call']
    if call == 'hostname':
        name = ap.desired_hostname(document)
        check(isinstance(name, str), 'desired_hostname returned a %s' % type(name).__name__)
        valid = ap.validate_hostname(name)
        check(valid == name and len(name) <= 64 and re.match(r'^[A-Za-z0-9.-]+\Z', name),
              'validate_hostname passed a bad name', repr(name[:80]))
    elif call == 'user':
        name, keys, paths, logins, password = ap.user_from_metadata(document)
        check(isinstance(name, str) and re.match(r'^[a-z_][a-z0-9_-]{0,31}\Z', name),
              'user_from_metadata passed a bad user name', repr(name[:40]))
        check(all(isinstance(k, str) and '\n' not in k and '\r' not in k for k in keys),
              'user_from_metadata returned a key that is not one line')
        check(all(isinstance(p, str) for p in paths) and logins in ('no', None)
              and password is None, 'user_from_metadata returned paths/flags of the wrong type')
    else:
        value = ap.compute_field(document, 'vmId')
        check(isinstance(value, str), 'compute_field returned a %s' % type(value).__name__)


# update_etc_hosts never passes '' or 'localhost' as the old name (it returns first)
OLD_NAMES = ['image-template', 'localhost.localdomain', 'debian', 'ip-10-0-0-4']
NEW_NAMES = ['web-7', 'web-7.example.com', 'a', 'x' * 63, 'image-template']


def call_hosts(case):
    text = text_of(case)
    old, new = case.params['old'], case.params['new']
    out = ap.rename_in_hosts(text, old, new)
    check(isinstance(out, str), 'returned a %s, not a str' % type(out).__name__)
    before, after = text.splitlines(), out.splitlines()
    check(len(before) == len(after), 'number of lines changed',
          '%d -> %d' % (len(before), len(after)))
    for line, result in zip(before, after):
        if result == line and old not in line:
            continue            # nothing to check: the common case, kept cheap
        words = line.partition('#')[0].split()
        if words and words[0] in ('127.0.0.1', '::1') and result != line:
            raise Violation('%s line changed (old name %r)' % (words[0], old),
                            '%r -> %r' % (line[:80], result[:80]))
        if words and canonical_address(words[0]) and words[0] not in ('127.0.0.1', '::1') \
                and old != new and old in result.partition('#')[0].split()[1:]:
            raise Violation('old name left on a %s line' % words[0], repr(result[:80]))


def canonical_address(text):
    """True for an IP address written the one usual way (not 127.1, 0177.0.0.1, ...)."""
    import ipaddress
    try:
        return str(ipaddress.ip_address(text)) == text
    except ValueError:
        return False


def call_ini(case):
    values = ap.ini_values(text_of(case), case.params['sections'], case.params['key'])
    check(isinstance(values, list) and all(isinstance(v, str) for v in values),
          'returned something that is not a list of str')


class Scratch(object):
    """A root directory of our own (mkdtemp) holding one case's file tree at a time;
    a worker makes its own inside the parent's, which the parent removes at the end."""

    def __init__(self, parent=None):
        self.root = tempfile.mkdtemp(prefix='fuzz-root-', dir=parent)
        self.written = set()

    def populate(self, tree, path, data):
        for stale in self.written - set(tree):
            os.remove(os.path.join(self.root, stale))
        for name, content in tree.items():
            full = os.path.join(self.root, name)
            if not os.path.isdir(os.path.dirname(full)):
                os.makedirs(os.path.dirname(full))
            with open(full, 'wb') as f:
                f.write(data if name == path else content)
        self.written = set(tree)
        return self.root


scratch = None      # set by main


def check_plan(plan):
    if plan is None:
        return
    check(isinstance(plan, tuple) and len(plan) == 4, 'returned %r, not None or a 4-tuple'
          % (plan,))
    client, commands, why_not, undo = plan

    def argvs(value):
        return isinstance(value, (list, tuple)) and all(
            isinstance(c, list) and all(isinstance(a, str) for a in c) for c in value)
    check(isinstance(client, str) and (why_not is None or isinstance(why_not, str))
          and (commands is None or isinstance(commands, list) and argvs(commands))
          and argvs(undo), 'plan of the wrong shape', repr(plan)[:80])


def root_of(case):
    """The case's file tree under our scratch directory, as the readers take a root:
    an ap.Root in scripts that have one, a path before."""
    top = scratch.populate(case.params['tree'], case.params['file'], case.data)
    return ap.Root(top) if hasattr(ap, 'Root') else top


def call_dhclient(case):
    check_plan(ap.dhclient_plan('eth0', 'web-7', root_of(case)))


def call_networkd(case):
    check_plan(ap.networkd_plan('eth0', 'web-7', root_of(case)))


def call_ssh_key(case):
    line = ap.validate_public_key(text_of(case))
    check(isinstance(line, str), 'returned a %s, not a str' % type(line).__name__)
    check('\n' not in line and '\r' not in line, 'returned more than one line', repr(line[:80]))
    check(line.split(' ')[0] in ap.KEY_TYPES, 'returned a line of an unknown type')


# --------------------------------------------------------------------------
# The targets
# --------------------------------------------------------------------------

class Target(object):
    def __init__(self, name, seeds, make, call, allowed):
        self.name, self.seeds, self.make, self.call = name, seeds, make, call
        self.allowed_names = allowed
        self._seeds = None

    def allowed(self):
        """The documented errors, as classes (names with 'ap.' are the script's)."""
        import builtins
        return tuple(getattr(ap, n[3:]) if n.startswith('ap.') else getattr(builtins, n)
                     for n in self.allowed_names)

    def seed_list(self):
        if self._seeds is None:
            self._seeds = self.seeds()
        return self._seeds


def goal_state_seeds():
    return data_files('.xml')


def ovf_env_seeds():
    """The samples, and one with every field the provisioner reads (a password with
    XML's specials, two keys, custom data)."""
    full = (b'<?xml version="1.0" encoding="utf-8"?>\n<ns0:Environment xmlns:ns0="x" '
            b'xmlns:ns1="y"><ns1:ProvisioningSection><ns1:LinuxProvisioningConfigurationSet>'
            b'<ns1:HostName>web-7</ns1:HostName><ns1:UserName>alice</ns1:UserName>'
            b'<ns1:UserPassword>p&lt;&amp;&gt;"w</ns1:UserPassword>'
            b'<ns1:DisableSshPasswordAuthentication>false</ns1:DisableSshPasswordAuthentication>'
            b'<ns1:SSH><ns1:PublicKeys><ns1:PublicKey><ns1:Path>/home/alice/.ssh/authorized_keys'
            b'</ns1:Path><ns1:Value>ssh-ed25519 AAAAC3Nza a@b</ns1:Value></ns1:PublicKey>'
            b'<ns1:PublicKey><ns1:Value>ssh-rsa AAAAB3 c@d</ns1:Value></ns1:PublicKey>'
            b'</ns1:PublicKeys></ns1:SSH><ns1:CustomData>AGN1c3RvbQ==</ns1:CustomData>'
            b'</ns1:LinuxProvisioningConfigurationSet></ns1:ProvisioningSection>'
            b'<ns1:PlatformSettingsSection><ns1:PlatformSettings><ns1:ProvisionGuestAgent>false'
            b'</ns1:ProvisionGuestAgent></ns1:PlatformSettings></ns1:PlatformSettingsSection>'
            b'</ns0:Environment>\n')
    return [seed for seed in data_files('.xml') if b'Environment' in seed] + [full]


def ini_seeds():
    return NETWORK_FILES


hosts_case = bytes_case(HOSTS_TOKENS, DECODINGS, ('old', OLD_NAMES), ('new', NEW_NAMES))
ini_case = bytes_case(INI_TOKENS, ('sections', [('DHCPv4', 'DHCP'), ('Network',), ('Match',)]),
                      ('key', ['SendHostname', 'Hostname', 'DHCP', 'Virtualization']))
dhclient_case = tree_case(DHCLIENT_FILES, DHCLIENT_TOKENS)
networkd_case = tree_case(NETWORKD_FILES, INI_TOKENS)

TARGETS = [
    #      name           seeds             make a case      call              documented errors
    Target('http',        http_seeds,       http_case,       call_http,        ['ap.TryAgain', 'OSError']),
    Target('goalstate',   goal_state_seeds, goal_state_case, call_goal_state,  ['ValueError']),
    Target('imds',        imds_seeds,       imds_case,       call_imds,        ['ValueError']),
    Target('imds-fields', imds_field_seeds, imds_value_case, call_imds_fields, ['ap.ProvisioningError']),
    Target('hosts',       hosts_seeds,      hosts_case,      call_hosts,       []),
    Target('ini',         ini_seeds,        ini_case,        call_ini,         []),
    Target('dhclient',    dhclient_seeds,   dhclient_case,   call_dhclient,    []),
    Target('networkd',    networkd_seeds,   networkd_case,   call_networkd,    []),
    Target('ssh-key',     ssh_key_seeds,    ssh_key_case,    call_ssh_key,     ['ap.ProvisioningError']),
    Target('ovf-env',     ovf_env_seeds,    goal_state_case, call_ovf_env,     ['ValueError']),
]
BY_NAME = dict((t.name, t) for t in TARGETS)


def make_case(target, seed, n):
    """Case n: seed n itself for the first cases (the samples must pass), then a
    mutation of a seed; a function of (seed, target, n) alone."""
    rng = random.Random('%d:%s:%d' % (seed, target.name, n))
    seeds = target.seed_list()
    if n < len(seeds):
        return target.make(rng, seeds[n], seeds, False)
    return target.make(rng, rng.choice(seeds), seeds, True)


# --------------------------------------------------------------------------
# Running a case (in this process, with a SIGALRM watchdog)
# --------------------------------------------------------------------------

class CaseTimeout(BaseException):
    """Raised by the watchdog; a BaseException so that `except Exception` in the
    code under test does not swallow it."""


def _alarm(signum, frame):
    raise CaseTimeout()


class Outcome(object):
    def __init__(self, status, key='', where='', message='', trace=''):
        self.status = status    # 'returned', 'rejected', 'skipped' or 'FAIL'
        self.key = key          # the failure class: exception type and where
        self.where = where
        self.message = message
        self.trace = trace


def in_script(filename):
    return os.path.abspath(filename) == os.path.abspath(ap.__file__)


def where_in_script(tb):
    """'function:line' of the innermost frame in the script, else of the innermost."""
    frames = traceback.extract_tb(tb)
    inside = [f for f in frames if in_script(f[0])]
    frame = (inside or frames or [('?', 0, '?', '')])[-1]
    return '%s:%d' % (frame[2], frame[1]) + ('' if inside else ' (not in the script)')


def run_case(target, case, limit):
    outcome = run_call(target, case, limit)
    if outcome.status == 'FAIL' and 'file' in case.params:     # which file of the tree
        outcome.key += ' (mutating %s)' % case.params['file']
    return outcome


def run_call(target, case, limit):
    allowed = target.allowed()
    previous = signal.signal(signal.SIGALRM, _alarm)
    try:
        try:
            signal.setitimer(signal.ITIMER_REAL, limit)
            try:
                target.call(case)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            return Outcome('returned')
        except allowed:
            return Outcome('rejected')
        except NotReached:
            return Outcome('skipped')
        except Violation as exc:
            return Outcome('FAIL', 'broken invariant: ' + exc.kind, target.name, str(exc),
                           traceback.format_exc())
        except CaseTimeout:
            where = where_in_script(sys.exc_info()[2])
            return Outcome('FAIL', 'hang at %s' % where.split(' ')[0], where,
                           'still running after %.1f s' % limit, traceback.format_exc())
        except KeyboardInterrupt:
            raise
        except BaseException as exc:    # RecursionError, MemoryError, SystemExit too
            where = where_in_script(sys.exc_info()[2])
            message = '%s: %s' % (type(exc).__name__, str(exc)[:300])
            if scratch:
                message = message.replace(scratch.root, '<root>')
            return Outcome('FAIL', '%s at %s' % (type(exc).__name__, where.split(' ')[0]),
                           where, message, traceback.format_exc())
    except CaseTimeout:     # the alarm went off between the call's end and its cancel
        return Outcome('returned')
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# --------------------------------------------------------------------------
# Worker (runs cases, one line each on its stdout) and supervisor (the parent)
# --------------------------------------------------------------------------

def worker(options):
    target = BY_NAME[options.only]
    channel = os.fdopen(os.dup(1), 'w')
    os.dup2(2, 1)           # whatever the code under test prints goes to stderr
    import faulthandler
    import resource
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))        # a crash leaves no core file
    faulthandler.enable(all_threads=True)                   # ... but its Python stack
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the parent's "where are you?"
    for n in range(options.first, options.cases):
        outcome = run_case(target, make_case(target, options.seed, n), options.time_limit)
        if outcome.status == 'FAIL':
            line = '%d FAIL %s' % (n, json.dumps([outcome.key, outcome.where, outcome.message]))
        else:
            line = '%d %s' % (n, outcome.status)
        channel.write(line + '\n')
        channel.flush()
    return 0


class Stats(object):
    def __init__(self, name):
        self.name = name
        self.counts = {'returned': 0, 'rejected': 0, 'skipped': 0, 'FAIL': 0}
        self.failures = {}      # key -> [count, first case, where, message]
        self.seconds = 0.0
        self.stopped = None     # why the target stopped before --cases, if it did

    def add(self, n, status, key='', where='', message=''):
        self.counts[status] += 1
        if status == 'FAIL':
            entry = self.failures.setdefault(key, [0, n, where, message])
            entry[0] += 1

    def cases(self):
        return sum(self.counts.values())


FRAME = re.compile(r'File "([^"]+)", line (\d+) in (\S+)')


def stuck_at(dump):
    """The innermost frame in the script of a faulthandler dump (innermost first)."""
    for filename, line, function in FRAME.findall(dump):
        if in_script(filename):
            return '%s:%s' % (function, line)
    frames = FRAME.findall(dump)
    return '%s:%s (not in the script)' % (frames[0][2], frames[0][1]) if frames else '?'


def supervise(target, options):
    """Run target's cases in worker processes; a hang or crash costs a worker, which is
    started again at the next case."""
    stats = Stats(target.name)
    started = time.monotonic()
    hard_limit = 2 * options.time_limit + 2
    n = 0
    while n < options.cases:
        if options.max_seconds and time.monotonic() - started > options.max_seconds:
            stats.stopped = 'time budget (--max-seconds %g) used up' % options.max_seconds
            break
        errors = tempfile.TemporaryFile()
        command = [sys.executable, os.path.abspath(__file__), '--worker', '--only', target.name,
                   '--seed', str(options.seed), '--first', str(n), '--cases', str(options.cases),
                   '--time-limit-per-case', str(options.time_limit), '--script', options.script,
                   '--scratch', scratch.root]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors)
        buffer, wait = b'', hard_limit + STARTUP_GRACE
        try:
            while n < options.cases:
                while b'\n' not in buffer:
                    if not select.select([process.stdout], [], [], wait)[0]:
                        raise CaseTimeout()
                    chunk = os.read(process.stdout.fileno(), 65536)
                    if not chunk:
                        raise EOFError()
                    buffer += chunk
                line, _, buffer = buffer.partition(b'\n')
                number, status, rest = (line.decode() + ' ').split(' ', 2)
                if status == 'FAIL':
                    stats.add(int(number), status, *json.loads(rest))
                else:
                    stats.add(int(number), status)
                n, wait = int(number) + 1, hard_limit
                if options.max_seconds and time.monotonic() - started > options.max_seconds:
                    break
        except CaseTimeout:
            process.send_signal(signal.SIGUSR1)     # faulthandler: dump the stacks
            time.sleep(0.5)
            process.kill()
            process.wait()
            errors.seek(0)
            where = stuck_at(errors.read().decode('utf-8', 'replace'))
            stats.add(n, 'FAIL', 'hang at %s (not interruptible)' % where.split(' ')[0], where,
                      'no answer in %.1f s; SIGALRM could not stop it' % hard_limit)
            n += 1
        except EOFError:
            code = process.wait()
            errors.seek(0)
            output = errors.read().decode('utf-8', 'replace')
            where = stuck_at(output)
            stats.add(n, 'FAIL', 'worker died (exit status %d) at %s' % (code, where.split(' ')[0]),
                      where, ' | '.join(output.strip().splitlines()[:2]))
            n += 1
        finally:
            if process.poll() is None:
                process.kill()
            process.wait()
            process.stdout.close()
            errors.close()
    stats.seconds = time.monotonic() - started
    return stats


def report_header(out):
    out.write('%-12s %7s %9s %9s %8s %8s %8s\n' % ('target', 'cases', 'returned', 'rejected',
                                                   'skipped', 'FAILED', 'seconds'))


def report_row(s, out):
    out.write('%-12s %7d %9d %9d %8d %8d %8.1f%s\n'
              % (s.name, s.cases(), s.counts['returned'], s.counts['rejected'],
                 s.counts['skipped'], s.counts['FAIL'], s.seconds,
                 '  (stopped: %s)' % s.stopped if s.stopped else ''))
    out.flush()


def report_failures(all_stats, options, out):
    failed = [s for s in all_stats if s.failures]
    if not failed:
        out.write('no failures\n')
    for s in failed:
        out.write('\n%s: %d failing cases in %d classes\n'
                  % (s.name, s.counts['FAIL'], len(s.failures)))
        for key, (count, first, where, message) in sorted(s.failures.items(),
                                                          key=lambda item: -item[1][0]):
            out.write('  %6d x %s\n' % (count, key))
            out.write('           first: case %d: %s\n' % (first, ascii(message[:200])[1:-1]))
            out.write('           replay: python3 tests/fuzz.py --seed %d --only %s --replay %d%s\n'
                      % (options.seed, s.name, first,
                         '' if options.script == SCRIPT else ' --script %s' % options.script))


# --------------------------------------------------------------------------
# Replay and minimize
# --------------------------------------------------------------------------

def show(data, limit=600):
    return '%d bytes: %r%s' % (len(data), data[:limit], '...' if len(data) > limit else '')


def minimize(target, case, key, limit, out, budget=120.0):
    """Delete chunks of the input (halving their size) while the failure keeps its class."""
    started = time.monotonic()
    data, chunk, tries = case.data, max(1, len(case.data) // 2), 0
    while chunk >= 1 and time.monotonic() - started < budget:
        i, shrunk = 0, False
        while i < len(data) and time.monotonic() - started < budget:
            candidate = data[:i] + data[i + chunk:]
            tries += 1
            if run_case(target, case.with_data(candidate), limit).key == key:
                data, shrunk = candidate, True
            else:
                i += chunk
        if not shrunk:
            chunk //= 2
    out.write('minimized in %d tries, %.1f s%s\n' % (tries, time.monotonic() - started,
                                                     ' (budget used up)' if chunk >= 1 else ''))
    return case.with_data(data)


def replay(target, options, out):
    case = make_case(target, options.seed, options.replay)
    params = dict((k, v) for k, v in case.params.items() if k != 'tree')
    out.write('target %s, seed %d, case %d; mutations: %s\n'
              % (target.name, options.seed, options.replay, ', '.join(case.notes) or 'none'))
    out.write('params: %r\ninput: %s\n' % (params, show(case.data)))
    outcome = run_case(target, case, options.time_limit)
    out.write('outcome: %s %s\n%s' % (outcome.status, outcome.message, outcome.trace))
    if outcome.status == 'FAIL' and options.minimize:
        case = minimize(target, case, outcome.key, options.time_limit, out)
        out.write('minimal input: %s\n' % show(case.data, 2000))
        outcome = run_case(target, case, options.time_limit)
        out.write('outcome: %s %s\n' % (outcome.status, outcome.message))
        if outcome.status != 'FAIL':
            out.write('(the minimal input passes here: the failure sits at a limit that depends '
                      'on the stack depth, e.g. the recursion limit; the input before minimizing '
                      'is the reproducer)\n')
    if options.save:
        with open(options.save, 'wb') as f:
            f.write(case.data)
        out.write('input written to %s\n' % options.save)
    return 1 if outcome.status == 'FAIL' else 0


# --------------------------------------------------------------------------

def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--cases', type=int, default=1000, help='cases per target')
    parser.add_argument('--seed', type=int, help='default: a random one (printed)')
    parser.add_argument('--only', help='comma-separated targets: %s'
                        % ', '.join(t.name for t in TARGETS))
    parser.add_argument('--time-limit-per-case', dest='time_limit', type=float, default=2.0,
                        metavar='SECONDS', help='a case running longer is a hang (default 2)')
    parser.add_argument('--max-seconds', type=float, default=3600.0,
                        help='stop a target after this long (default 3600; 0: no limit)')
    parser.add_argument('--script', default=SCRIPT, help='the azure_provisioning.py to test')
    parser.add_argument('--replay', type=int, metavar='N', help='run case N of one target')
    parser.add_argument('--minimize', action='store_true', help='with --replay: shrink it')
    parser.add_argument('--save', metavar='FILE', help='with --replay: write the input')
    parser.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
    parser.add_argument('--first', type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument('--scratch', help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    names = options.only.split(',') if options.only else [t.name for t in TARGETS]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        parser.error('unknown target %s (known: %s)'
                     % (', '.join(unknown), ', '.join(t.name for t in TARGETS)))
    if options.replay is not None and len(names) != 1:
        parser.error('--replay needs --only with one target')
    if options.replay is not None and options.seed is None:
        parser.error('--replay needs the --seed of the campaign')
    if options.cases < 0 or options.time_limit <= 0:
        parser.error('--cases must be >= 0 and --time-limit-per-case > 0')
    if options.seed is None:
        options.seed = int.from_bytes(os.urandom(4), 'big')
    options.script = os.path.abspath(options.script)
    options.targets = [BY_NAME[n] for n in names]
    return options


def main(argv=None, out=None):
    global scratch
    out = out or sys.stdout
    options = parse_args(sys.argv[1:] if argv is None else argv)
    load_script(options.script)
    scratch = Scratch(options.scratch if options.worker else None)
    try:
        if options.worker:
            return worker(options)
        if options.replay is not None:
            return replay(options.targets[0], options, out)
        out.write('fuzz: seed %d, %d cases per target, %.1f s per case, Python %s, %s\n'
                  % (options.seed, options.cases, options.time_limit,
                     sys.version.split()[0], options.script))
        out.flush()
        report_header(out)
        all_stats = []
        for target in options.targets:
            all_stats.append(supervise(target, options))
            report_row(all_stats[-1], out)
        report_failures(all_stats, options, out)
        return 1 if any(s.failures for s in all_stats) else 0
    finally:
        shutil.rmtree(scratch.root, ignore_errors=True)     # our own mkdtemp


if __name__ == '__main__':
    sys.exit(main())
