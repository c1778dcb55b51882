#!/usr/bin/env python3
"""WireServer + IMDS emulator for testing Azure provisioning agents.

Serves, on 127.0.0.1 by default, what an Azure VM sees at 168.63.129.16 (the
WireServer: versions, goal state, health reports) and at 169.254.169.254 (the
Instance Metadata Service), built from real payloads kept in tests/data/ (see
tests/data/SOURCES.md).  It checks what a client sends as strictly as the real
services are known to, and can inject faults: error statuses, dropped
connections, delays, a WireServer that comes up late, a dead IMDS.

Python:

    from tests.fake_azure import FakeAzure
    with FakeAzure(computer_name="web-7") as az:
        run_agent("--wireserver", az.wireserver_addr, "--imds", az.imds_addr)
        assert az.ready_accepted()

Command line (python3 tests/fake_azure.py --help):

    serve   run the emulator until SIGTERM/SIGINT
    run     run a command against the emulator, then summarise what it saw
    demo    run the repo's azure_provisioning.py against it in a private namespace
    media   write provisioning media: a UDF/ISO 9660 disc holding ovf-env.xml
    boot    boot a disk image under QEMU as an Azure VM against the emulator and say
            whether it provisions (tests/boot_kit.py; boot --help)

Provisioning media (the disc Azure attaches at first boot; needs genisoimage):

    from tests.fake_azure import make_ovf_env, build_media
    build_media("media.iso", make_ovf_env("web-7", "alice", public_keys=[key]))

Standard library only; Python 3.6 .. 3.13.  It never talks to anything but the
addresses it is told to listen on.
"""

import argparse
import base64
import collections
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from socketserver import TCPServer, ThreadingMixIn
from urllib.parse import parse_qs, quote, urlsplit
from xml.etree import ElementTree
from xml.sax.saxutils import escape as xml_escape

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

GOAL_STATE_SAMPLE = "walinuxagent__GoalState-incarnation-3.xml"
VERSIONS_SAMPLE = "afterburn__mock_tests-versions.xml"
IMDS_SAMPLE = "azure-docs__imds-full-instance-response-linux.json"
IMDS_ERROR_SAMPLE = "azure-docs__imds-error-missing-api-version.json"

DEFAULT_VM_ID = "02aab8a4-74ef-476e-8182-f6d2ba4166a6"
DEFAULT_CONTAINER_ID = "7b324f53-983a-43bc-b919-1775d6077608"

# The WireServer answers 500 when a health report's Description is longer than
# this (WALinuxAgent issue #2017 / PR #2020).
MAX_DESCRIPTION_CHARS = 4096
MAX_BODY_BYTES = 1024 * 1024


def _read_data(name):
    with open(os.path.join(DATA_DIR, name), "rb") as f:
        return f.read().decode("utf-8")


def _fake_ssh_key(comment):
    """A well-formed (but useless) ssh-ed25519 public key line."""
    blob = struct.pack(">I", 11) + b"ssh-ed25519" + struct.pack(">I", 32) + bytes(32)
    return "ssh-ed25519 %s %s" % (base64.b64encode(blob).decode("ascii"), comment)


# ---------------------------------------------------------------------------
# Fault lists
# ---------------------------------------------------------------------------
# Items as given by callers: 503 / "reset" / ("delay", 2) / ("status", 429, {...}).
# Internally each becomes a tuple: ("status", code, headers), ("reset",) or
# ("delay", seconds).

def normalize_fault(item):
    if isinstance(item, bool):
        raise ValueError("bad fault item: %r" % (item,))
    if isinstance(item, int):
        return ("status", item, {})
    if item == "reset":
        return ("reset",)
    if isinstance(item, (tuple, list)) and item:
        if item[0] == "delay" and len(item) == 2:
            return ("delay", float(item[1]))
        if item[0] == "status" and len(item) in (2, 3):
            headers = dict(item[2]) if len(item) == 3 else {}
            return ("status", int(item[1]), headers)
    raise ValueError("bad fault item: %r (use an int status, 'reset', ('delay', s) "
                     "or ('status', code, {headers}))" % (item,))


def parse_fault_list(text):
    """CLI form -> constructor form: '503,reset,delay:2,429:1' (429:1 = 429 with
    Retry-After: 1)."""
    faults = []
    for word in [w.strip() for w in text.split(",") if w.strip()]:
        head, _, arg = word.partition(":")
        if word == "reset":
            faults.append("reset")
        elif head == "delay" and arg:
            faults.append(("delay", float(arg)))
        elif re.match(r"^[0-9]{3}$", head) and not arg:
            faults.append(int(head))
        elif re.match(r"^[0-9]{3}$", head) and arg:
            faults.append(("status", int(head), {"Retry-After": arg}))
        else:
            raise ValueError("bad fault %r (expected CODE, CODE:RETRY_AFTER, reset "
                             "or delay:SECONDS)" % word)
    return faults


# ---------------------------------------------------------------------------
# Documents
# ---------------------------------------------------------------------------

def _azure_url_quote(text):
    """Quote an instance id the way WireServer URLs do: '-' and '_' too."""
    return "".join(chr(b) if chr(b).isalnum() and b < 128 or b == ord(".") else "%%%02X" % b
                   for b in bytearray(text.encode("utf-8")))


def _replace_once(text, old, new):
    # Each substitution must hit, so a changed sample file fails loudly.
    if old not in text:
        raise RuntimeError("goal-state sample changed: %r not found" % old)
    return text.replace(old, new)


def make_goal_state_template():
    """The real WALinuxAgent sample turned into a %-free template with fields
    {incarnation} {container_id} {instance_id} {instance_url} {base_url}.

    The URL elements stay unpadded, as in every captured goal state: waagent takes
    their text verbatim (padding there made it fail with "URL can't contain control
    characters"; only cloud-init's hand-wrapped test template is padded)."""
    text = _read_data(GOAL_STATE_SAMPLE)
    text = text.replace("{", "{{").replace("}", "}}")
    text = _replace_once(text, "<Incarnation>3</Incarnation>",
                         "<Incarnation>{incarnation}</Incarnation>")
    text = _replace_once(text, "incarnation=3", "incarnation={incarnation}")
    text = _replace_once(text, "http://168.63.129.16:80/machine/7db6fcb6-9911-4da4-8687/",
                         "http://{base_url}/machine/{container_url}/")
    text = _replace_once(text, "7db6fcb6-9911-4da4-8687", "{container_id}")
    text = _replace_once(text, "00abac54-f426-4653-bcc6-0ed70cddda87._kvm03</InstanceId>",
                         "{instance_id}</InstanceId>")
    text = _replace_once(text, "00abac64%2Df426%2D4653%2Dbaa6%2D0ed70cdcca87.%5Fkvm03",
                         "{instance_url}")
    return text


def strip_role_instance_list(goal_state):
    """The "not ready yet" shape: a Container without RoleInstanceList."""
    return re.sub(r"\n\s*<RoleInstanceList>.*</RoleInstanceList>", "", goal_state,
                  flags=re.S)


def make_instance_document(vm_name, computer_name, vm_id, admin_username,
                           public_keys, os_profile, disable_password_authentication=True,
                           mac_address=None, private_ip=None):
    """Microsoft's published Linux instance document with our values.  mac_address
    ("52:54:00:a2:00:01") and private_ip: the VM's NIC, as IMDS describes it (agents
    match their network configuration to this MAC: cloud-init does)."""
    doc = json.loads(_read_data(IMDS_SAMPLE), object_pairs_hook=collections.OrderedDict)
    nic = doc["network"]["interface"][0]
    if mac_address:
        nic["macAddress"] = mac_address.replace(":", "").replace("-", "").upper()
    if private_ip:
        nic["ipv4"]["ipAddress"][0]["privateIpAddress"] = private_ip
    compute = doc["compute"]
    compute["name"] = vm_name
    compute["vmId"] = vm_id
    compute["resourceId"] = compute["resourceId"].rsplit("/", 1)[0] + "/" + vm_name
    if os_profile:
        compute["osProfile"]["computerName"] = computer_name
        compute["osProfile"]["adminUsername"] = admin_username
        compute["osProfile"]["disablePasswordAuthentication"] = (
            "true" if disable_password_authentication else "false")
    else:
        del compute["osProfile"]    # older api-versions and some images have none
    compute["publicKeys"] = public_keys
    return doc


# compute.userData exists from this api-version on (PROTOCOL.md, "IMDS user data").
USER_DATA_API_VERSION = "2021-01-01"


def has_user_data(api_version):
    """Whether documents of this api-version ("2021-02-01") carry compute.userData."""
    date = re.match(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}", api_version)
    return bool(date) and date.group(0) >= USER_DATA_API_VERSION


def with_user_data(doc, user_data):
    """A copy of the instance document with compute.userData: base64 of the bytes
    user_data, or "" (what IMDS answers when there is none).  It goes where real
    documents have it, just before "version" (after tags/tagsList)."""
    value = base64.b64encode(bytes(user_data)).decode("ascii") if user_data else ""
    doc = json.loads(json.dumps(doc), object_pairs_hook=collections.OrderedDict)
    compute = collections.OrderedDict()
    for key, item in doc["compute"].items():
        if key == "version":
            compute["userData"] = value
        compute[key] = item
    compute.setdefault("userData", value)   # a sample without "version": at the end
    doc["compute"] = compute
    return doc


def make_public_keys(public_keys, admin_username):
    path = "/home/%s/.ssh/authorized_keys" % admin_username
    if public_keys is None:
        # Trailing newline as in real documents (azure-init's capture, cloud-init #3825).
        public_keys = [_fake_ssh_key("fake-azure") + "\n"]
    return [dict(k) if isinstance(k, dict) else {"keyData": k, "path": path}
            for k in public_keys]


def imds_error(message, versions=None):
    """An IMDS 400 body shaped like azure-docs' sample."""
    body = collections.OrderedDict([("error", message)])
    if versions:
        body["newest-versions"] = list(versions)
    return json.dumps(body, indent=4) + "\n"


def parse_health_report(raw):
    """Health XML -> dict (None for absent fields).  Raises ValueError when the
    body is not acceptable XML at all."""
    if re.search(br"<!DOCTYPE", raw, re.I):
        raise ValueError("DTDs are not accepted")
    try:
        root = ElementTree.fromstring(raw)
    except ElementTree.ParseError as e:
        raise ValueError("malformed XML: %s" % e)
    for element in root.iter():     # tolerate namespaces: compare local names
        if isinstance(element.tag, str) and "}" in element.tag:
            element.tag = element.tag.split("}", 1)[1]

    def text(path):
        element = root.find(path)
        return None if element is None or element.text is None else element.text.strip()

    role = "Container/RoleInstanceList/Role/"
    incarnation = text("GoalStateIncarnation")
    if incarnation is not None and re.match(r"^[0-9]+$", incarnation):
        incarnation = int(incarnation)
    return {
        "root": root.tag,
        "state": text(role + "Health/State"),
        "substatus": text(role + "Health/Details/SubStatus"),
        "description": text(role + "Health/Details/Description"),
        "incarnation": incarnation,
        "container_id": text("Container/ContainerId"),
        "instance_id": text(role + "InstanceId"),
    }


# ---------------------------------------------------------------------------
# Provisioning media (ovf-env.xml on a UDF/ISO 9660 disc)
# ---------------------------------------------------------------------------

OVF_ENV_NAME = "ovf-env.xml"
# Shaped like the RDFE build labels Azure's front end reports (e.g. in its Server
# header, "rd_rdfe_stable.141015-1306"); agents find the disc by device name and
# filesystem type, never by its label.
MEDIA_VOLUME_ID = "rd_rdfe_stable.141015-1306"
MEDIA_TOOL = "genisoimage"      # Debian package and program of the same name

# The shape of WALinuxAgent's tests/data/ovf-env.xml (a real document), indented
# with spaces only.  {fields} are filled with XML-escaped text.
OVF_ENV_TEMPLATE = """\
<?xml version="1.0" encoding="utf-8"?>
<Environment xmlns="http://schemas.dmtf.org/ovf/environment/1" \
xmlns:oe="http://schemas.dmtf.org/ovf/environment/1" \
xmlns:wa="http://schemas.microsoft.com/windowsazure" \
xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
    <wa:ProvisioningSection>
      <wa:Version>1.0</wa:Version>
      <LinuxProvisioningConfigurationSet xmlns="http://schemas.microsoft.com/windowsazure" \
xmlns:i="http://www.w3.org/2001/XMLSchema-instance">
        <ConfigurationSetType>LinuxProvisioningConfiguration</ConfigurationSetType>
        <HostName>{hostname}</HostName>
        <UserName>{username}</UserName>
{password}\
        <DisableSshPasswordAuthentication>{disable_password}</DisableSshPasswordAuthentication>
{ssh}\
{custom_data}\
      </LinuxProvisioningConfigurationSet>
    </wa:ProvisioningSection>
    <wa:PlatformSettingsSection>
      <wa:Version>1.0</wa:Version>
      <wa:PlatformSettings>
        <wa:KmsServerHostname>kms.core.windows.net</wa:KmsServerHostname>
        <wa:ProvisionGuestAgent>{provision_guest_agent}</wa:ProvisionGuestAgent>
        <wa:GuestAgentPackageName xsi:nil="true"/>
        <wa:RetainWindowsPEPassInUnattend>true</wa:RetainWindowsPEPassInUnattend>
        <wa:RetainOfflineServicingPassInUnattend>true</wa:RetainOfflineServicingPassInUnattend>
        <wa:PreprovisionedVm>false</wa:PreprovisionedVm>
      </wa:PlatformSettings>
    </wa:PlatformSettingsSection>
</Environment>
"""

OVF_PUBLIC_KEY_TEMPLATE = """\
            <PublicKey>
              <Fingerprint>{fingerprint}</Fingerprint>
              <Path>{path}</Path>
              <Value>{value}</Value>
            </PublicKey>
"""

# Characters XML 1.0 cannot carry at all, even as character references.
_XML_FORBIDDEN = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


class MissingTool(OSError):
    """A program the media builder needs is not installed."""


def ovf_text(value, what):
    """value as XML element text that parses back to exactly value: & < > escaped,
    and CR as a reference (parsers turn a literal CR or CRLF into LF)."""
    if not isinstance(value, str):
        raise TypeError("%s must be a str, not %s" % (what, type(value).__name__))
    bad = _XML_FORBIDDEN.search(value)
    if bad:
        raise ValueError("%s holds %r, which XML 1.0 cannot represent"
                         % (what, bad.group(0)))
    return xml_escape(value).replace("\r", "&#13;")


def ovf_fingerprint(key_data):
    """Upper-case hex SHA-1, the shape of the Fingerprint Azure writes (a
    certificate thumbprint): here the SHA-1 of the key's base64 blob."""
    words = key_data.split()
    blob = words[1] if len(words) > 1 else key_data
    return hashlib.sha1(blob.encode("utf-8")).hexdigest().upper()


def make_ovf_env(hostname, username, password=None, disable_ssh_password_auth=True,
                 public_keys=(), custom_data=None, provision_guest_agent=False):
    """The ovf-env.xml text Azure puts on the provisioning disc.

    password None leaves UserPassword out (an SSH-key-only VM); custom_data
    (bytes, None leaves CustomData out) is base64-encoded; each public key
    (the key line as text) gets a Fingerprint and the Path
    /home/USERNAME/.ssh/authorized_keys.  Every value is XML-escaped; a value
    XML cannot carry (a NUL, say) raises ValueError."""
    fields = {
        "hostname": ovf_text(hostname, "hostname"),
        "username": ovf_text(username, "username"),
        "disable_password": "true" if disable_ssh_password_auth else "false",
        "provision_guest_agent": "true" if provision_guest_agent else "false",
        "password": "", "ssh": "", "custom_data": "",
    }
    if password is not None:
        fields["password"] = ("        <UserPassword>%s</UserPassword>\n"
                              % ovf_text(password, "password"))
    if isinstance(public_keys, str):
        public_keys = [public_keys]     # one key, not its characters
    keys = "".join(OVF_PUBLIC_KEY_TEMPLATE.format(
        fingerprint=ovf_fingerprint(key),
        path=ovf_text("/home/%s/.ssh/authorized_keys" % username, "username"),
        value=ovf_text(key, "public key")) for key in public_keys)
    if keys:
        fields["ssh"] = ("        <SSH>\n          <PublicKeys>\n%s          </PublicKeys>\n"
                         "        </SSH>\n" % keys)
    if custom_data is not None:
        if not isinstance(custom_data, (bytes, bytearray)):
            raise TypeError("custom_data must be bytes, not %s" % type(custom_data).__name__)
        fields["custom_data"] = ("        <CustomData>%s</CustomData>\n"
                                 % base64.b64encode(bytes(custom_data)).decode("ascii"))
    return OVF_ENV_TEMPLATE.format(**fields)


def _write_private(path, data):
    """Write data to path, a new file readable by its owner only (the media
    carries the password and custom data)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def build_media(out_path, ovf_env_text, volume_id=MEDIA_VOLUME_ID):
    """Write to out_path a disc image holding ovf_env_text as /ovf-env.xml: UDF
    (what Azure attaches) bridged with ISO 9660 + Rock Ridge + Joliet, so that
    `mount -t udf` and `mount -t iso9660` both read it.  Needs genisoimage
    (raises MissingTool naming the Debian package when it is absent)."""
    tool = shutil.which(MEDIA_TOOL)
    if tool is None:
        raise MissingTool("%s not found: install the Debian package %s "
                          "(apt-get install %s) to build provisioning media"
                          % (MEDIA_TOOL, MEDIA_TOOL, MEDIA_TOOL))
    data = ovf_env_text.encode("utf-8") if isinstance(ovf_env_text, str) else ovf_env_text
    scratch = tempfile.mkdtemp(prefix="fake-azure-media-")
    try:
        root = os.path.join(scratch, "root")
        os.mkdir(root)
        _write_private(os.path.join(root, OVF_ENV_NAME), data)
        image = os.path.join(scratch, "media.iso")
        process = subprocess.Popen(
            [tool, "-quiet", "-udf", "-R", "-J", "-V", volume_id, "-o", image, root],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            universal_newlines=True)
        try:
            output = process.communicate(timeout=60)[0]
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            raise RuntimeError("%s did not finish in 60 s" % MEDIA_TOOL)
        if process.returncode != 0:
            raise RuntimeError("%s failed (exit %d): %s"
                               % (MEDIA_TOOL, process.returncode, output.strip()))
        with open(image, "rb") as f:
            _write_private(out_path, f.read())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return out_path


# ---------------------------------------------------------------------------
# HTTP plumbing
# ---------------------------------------------------------------------------

class Reply(object):
    def __init__(self, status, body="", content_type="text/plain; charset=utf-8",
                 headers=None, close=False):
        self.status = status
        self.body = body.encode("utf-8") if isinstance(body, str) else body
        self.content_type = content_type
        self.headers = headers or {}
        self.close = close


RESET = object()    # "answer" meaning: drop the connection with a TCP RST


class _Server(ThreadingMixIn, HTTPServer):
    """ThreadingHTTPServer for Python 3.6 too.  Bound at construction; listen()
    happens only in activate(), so a not-yet-up port refuses connections."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, address, fake, kind):
        # SO_REUSEADDR only for fixed ports: on Linux two sockets that both set
        # it may bind the same port while neither listens, and our reserved
        # (bound, not listening) ports must stay ours.
        self.allow_reuse_address = address[1] != 0
        HTTPServer.__init__(self, address, _Handler, bind_and_activate=False)
        self.fake = fake
        self.kind = kind
        self.connections = set()
        self.connections_lock = threading.Lock()
        self.thread = None
        try:
            self.server_bind()
        except Exception:
            self.server_close()
            raise

    def server_bind(self):
        # HTTPServer.server_bind() would call socket.getfqdn(), which can send a
        # DNS query off this machine: bind only.
        TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]
        self.addr = "%s:%d" % self.server_address[:2]     # still known after stop()

    def activate(self):
        self.server_activate()      # listen()
        self.thread = threading.Thread(target=self.serve_forever,
                                       kwargs={"poll_interval": 0.05},
                                       name="fake-azure-" + self.kind)
        self.thread.daemon = True
        self.thread.start()

    def process_request(self, request, client_address):
        with self.connections_lock:
            self.connections.add(request)
        ThreadingMixIn.process_request(self, request, client_address)

    def shutdown_request(self, request):
        with self.connections_lock:
            self.connections.discard(request)
        HTTPServer.shutdown_request(self, request)

    def stop(self):
        if self.thread is not None:
            self.shutdown()
            self.thread.join(5)
        self.server_close()
        # Idle keep-alive connections would otherwise linger in their threads.
        with self.connections_lock:
            connections = list(self.connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _BadRequest(Exception):
    pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"   # keep-alive, like IIS / IMDS
    server_version = "fake-azure"
    sys_version = ""
    timeout = 30                    # idle keep-alive connections end eventually

    def do_GET(self):
        self._handle()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_GET

    def version_string(self):
        return self.server_version

    def log_message(self, format, *args):
        pass    # requests are recorded and optionally logged by FakeAzure

    def _read_body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        length = self.headers.get("Content-Length")
        if length is None:
            return b""
        if not re.match(r"^\s*[0-9]+\s*$", length) or int(length) > MAX_BODY_BYTES:
            raise _BadRequest("bad Content-Length")
        return self.rfile.read(int(length))

    def _read_chunked(self):
        body = b""
        while True:
            size_line = self.rfile.readline(1024).split(b";")[0].strip()
            try:
                size = int(size_line, 16)
            except ValueError:
                raise _BadRequest("bad chunk size")
            if size == 0:
                while self.rfile.readline(1024).strip():
                    pass    # trailers
                return body
            body += self.rfile.read(size)
            self.rfile.readline(1024)
            if len(body) > MAX_BODY_BYTES:
                raise _BadRequest("body too large")

    def _handle(self):
        fake = self.server.fake
        request = {
            "server": self.server.kind,
            "method": self.command,
            "path": self.path,
            "headers": dict((k.lower(), v) for k, v in self.headers.items()),
            "body": "",
            "status": 0,        # 0: the connection was dropped unanswered
            "fault": None,      # the injected fault(s), e.g. "delay 0.5, status 503"
            "time": time.time(),
        }
        try:
            raw = self._read_body()
            request["body"] = raw.decode("utf-8", "replace")
            if fake.on_request is not None:
                fake.on_request(self.server.kind, self.command, self.path, request["headers"])
            reply, request["fault"] = fake._answer(self.server.kind, self.command,
                                                   self.path, request["headers"], raw)
        except _BadRequest as e:
            reply = Reply(400, str(e) + "\n", close=True)
        if reply is RESET:
            fake._record_request(request)
            self._reset()
            return
        request["status"] = reply.status
        fake._record_request(request)
        self._send(reply)

    def _send(self, reply):
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        for name, value in reply.headers.items():
            self.send_header(name, value)
        if reply.close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(reply.body)

    def _reset(self):
        """Close with RST, no answer.  rfile (a makefile()) holds a reference to
        the socket, so close it first or close() would not really close; wfile
        writes to the socket directly and is left for the base class to flush."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.rfile.close()
        self.connection.close()


# ---------------------------------------------------------------------------
# The emulator
# ---------------------------------------------------------------------------

class FakeAzure(object):
    """WireServer + IMDS on two ephemeral ports.  Starts serving at construction
    (use it as a context manager, or call stop())."""

    def __init__(self, host="127.0.0.1", wireserver_port=0, imds_port=0,
                 computer_name="web-7", vm_name=None, os_profile=True, incarnation=1,
                 container_id=DEFAULT_CONTAINER_ID, instance_id=None,
                 admin_username="azureuser", public_keys=None, imds_api_versions=None,
                 wire_faults=None, imds_faults=None, goalstate_faults=None,
                 health_faults=None, goal_state_body=None, imds_body=None,
                 no_role_instance_for=0,
                 bump_incarnation_after=None, wireserver_up_after=0.0, imds_down=False,
                 vm_id=DEFAULT_VM_ID, record_file=None, verbose=False, user_data=None,
                 on_request=None, disable_password_authentication=True,
                 mac_address=None, private_ip=None, advertised_wireserver=None):
        if user_data is not None and not isinstance(user_data, (bytes, bytearray)):
            raise TypeError("user_data must be bytes, not %s" % type(user_data).__name__)
        self.computer_name = computer_name
        # HOST:PORT the goal state's URLs name (HostingEnvironmentConfig...): where a
        # client reaches this WireServer; inside a VM, "168.63.129.16:80"
        self.advertised_wireserver = advertised_wireserver
        self.vm_name = vm_name if vm_name is not None else computer_name
        self.vm_id = vm_id
        self.container_id = container_id
        # Real instance ids look like "<vmId>._<vm name>".
        self.instance_id = instance_id or "%s._%s" % (vm_id, self.vm_name)
        self.admin_username = admin_username
        self.imds_api_versions = list(imds_api_versions) if imds_api_versions else None
        self.goal_state_body = goal_state_body
        self.imds_body = imds_body
        self.no_role_instance_for = no_role_instance_for
        self.bump_incarnation_after = bump_incarnation_after
        self.wireserver_up_after = wireserver_up_after
        self.imds_down = imds_down
        self.record_file = record_file
        self.verbose = verbose
        # called with (kind, method, path, headers) as a request arrives, before any
        # fault or answer: a test can act while it is pending (cut a VM's power)
        self.on_request = on_request
        self.wireserver_up_at = None    # set when a late WireServer starts listening

        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._incarnation = incarnation
        self._goal_states_served = 0
        self._requests = []
        self._health_reports = []
        self._faults = {name: collections.deque(normalize_fault(f) for f in (faults or []))
                        for name, faults in (("wireserver", wire_faults),
                                             ("imds", imds_faults),
                                             ("goalstate", goalstate_faults),
                                             ("health", health_faults))}

        self._goal_state_template = make_goal_state_template()
        self._versions = _read_data(VERSIONS_SAMPLE)
        self._supported_versions = re.findall(r"<Version>([^<]+)</Version>", self._versions)
        self._imds_doc = make_instance_document(
            self.vm_name, computer_name, vm_id, admin_username,
            make_public_keys(public_keys, admin_username), os_profile,
            disable_password_authentication, mac_address, private_ip)
        # api-versions from 2021-01-01 on get compute.userData; older ones do not
        self.user_data = user_data
        self._imds_doc_user_data = with_user_data(self._imds_doc, user_data)
        self._imds_sample_versions = json.loads(_read_data(IMDS_ERROR_SAMPLE))["newest-versions"]

        self._servers = []
        self._timer = None
        try:
            self._wire = self._add_server(host, wireserver_port, "wireserver")
            self._imds = self._add_server(host, imds_port, "imds")
            self.start()
        except Exception:
            self.stop()
            raise

    def _add_server(self, host, port, kind):
        server = _Server((host, port), self, kind)
        self._servers.append(server)
        return server

    # -- lifecycle ---------------------------------------------------------

    def start(self):
        """Called by the constructor; calling it again does nothing."""
        if self._wire.thread is not None or self._timer is not None:
            return
        if not self.imds_down:
            self._imds.activate()
        if self.wireserver_up_after > 0:
            self._timer = threading.Timer(self.wireserver_up_after, self._late_start)
            self._timer.daemon = True
            self._timer.start()
        else:
            self._wire.activate()

    def _late_start(self):
        with self._lock:
            if not self._stopping.is_set():
                self._wire.activate()
                # time.time(), the clock of the request records: latency measurements
                self.wireserver_up_at = time.time()

    def stop(self):
        with self._lock:
            self._stopping.set()
            if self._timer is not None:
                self._timer.cancel()
        for server in self._servers:
            server.stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
        return False

    # -- what tests read ---------------------------------------------------

    @property
    def wireserver_addr(self):
        return self._wire.addr

    @property
    def imds_addr(self):
        return self._imds.addr

    @property
    def requests(self):
        with self._lock:
            return list(self._requests)

    @property
    def health_reports(self):
        with self._lock:
            return list(self._health_reports)

    @property
    def incarnation(self):
        with self._lock:
            return self._incarnation

    @property
    def goal_states_served(self):
        with self._lock:
            return self._goal_states_served

    def ready_accepted(self):
        return any(r["state"] == "Ready" and 200 <= r["status"] < 300
                   for r in self.health_reports)

    def wait_for(self, predicate, timeout=10.0, interval=0.02):
        """Poll predicate() until true or timeout; returns its last result."""
        deadline = time.monotonic() + timeout
        while True:
            result = predicate()
            if result or time.monotonic() >= deadline:
                return result
            time.sleep(interval)

    def goal_state_document(self, with_role_instances=True):
        """The goal state as it would be served now (without counting it)."""
        with self._lock:
            return self._render_goal_state(with_role_instances)

    # -- recording ---------------------------------------------------------

    def _record_request(self, request):
        with self._lock:
            self._requests.append(request)
            self._write_record(dict(request, type="request"))
        if self.verbose:
            sys.stderr.write("fake_azure: %s\n" % _request_line(request))
            sys.stderr.flush()

    def _write_record(self, entry):
        # Caller holds self._lock, so lines never interleave.
        if self.record_file:
            with open(self.record_file, "a") as f:
                f.write(json.dumps(entry, sort_keys=True) + "\n")

    # -- request handling --------------------------------------------------

    def _answer(self, kind, method, path, headers, raw):
        """(Reply or RESET, description of injected faults or None) for one
        request.  Runs in a handler thread."""
        endpoint = self._endpoint(kind, path)
        faults = self._take_faults(kind, endpoint)
        applied = ", ".join(" ".join(str(x) for x in f[:2]) for f in faults) or None
        for fault in faults:
            if fault[0] == "delay":
                self._stopping.wait(fault[1])
            elif fault[0] == "reset":
                return RESET, applied
            else:
                return self._fault_reply(kind, fault[1], fault[2]), applied
        if kind == "imds":
            return self._imds_answer(method, path, headers), applied
        return self._wire_answer(endpoint, method, headers, raw, path), applied

    def _endpoint(self, kind, path):
        if kind == "imds":
            return None
        url = urlsplit(path)
        comp = parse_qs(url.query).get("comp", [""])[0]
        if url.path in ("/machine", "/machine/") and comp in ("goalstate", "health"):
            return comp
        if url.path == "/" and comp == "versions":
            return "versions"
        if url.path.startswith("/machine/") and comp in ("config", "certificates"):
            return comp     # the documents the goal state's <Configuration> links to
        return None

    def _take_faults(self, kind, endpoint):
        """Pop this request's fault items: one from the server's list, then (if
        that was only a delay or nothing) one from the endpoint's list."""
        taken = []
        with self._lock:
            for name in (kind, endpoint):
                queue = self._faults.get(name)
                if queue:
                    taken.append(queue.popleft())
                    if taken[-1][0] != "delay":
                        break
        return taken

    def _fault_reply(self, kind, status, headers):
        reason = BaseHTTPRequestHandler.responses.get(status, ("Error",))[0]
        if kind == "imds":
            body = json.dumps({"error": reason}) + "\n"
            return Reply(status, body, "application/json; charset=utf-8", headers)
        # What HTTP.sys in front of the WireServer answers (WALinuxAgent issue #95).
        body = ('<!DOCTYPE HTML PUBLIC "-//W3C//DTD HTML 4.01//EN""http://www.w3.org/TR/'
                'html4/strict.dtd">\r\n<HTML><HEAD><TITLE>%s</TITLE>\r\n<META HTTP-EQUIV='
                '"Content-Type" Content="text/html; charset=us-ascii"></HEAD>\r\n<BODY><h2>'
                '%s</h2>\r\n<hr><p>HTTP Error %d. The service is unavailable.</p>\r\n'
                '</BODY></HTML>\r\n' % (reason, reason, status))
        return Reply(status, body, "text/html; charset=us-ascii", headers, close=True)

    # -- WireServer --------------------------------------------------------

    def _wire_answer(self, endpoint, method, headers, raw, path=""):
        wanted = {"versions": "GET", "goalstate": "GET", "health": "POST", "config": "GET",
                  "certificates": "GET"}.get(endpoint)
        if wanted is None:
            return Reply(404, "Not found\n")
        if method != wanted:
            return Reply(405, "Method not allowed\n", headers={"Allow": wanted})
        if endpoint == "versions":
            return Reply(200, self._versions, "text/xml; charset=utf-8")
        version = headers.get("x-ms-version")
        if version is None:
            return Reply(400, "Missing x-ms-version header\n")
        if version.strip() not in self._supported_versions:
            return Reply(400, "Unsupported x-ms-version %r\n" % version)
        if endpoint == "goalstate":
            return Reply(200, self._serve_goal_state(), "text/xml; charset=utf-8")
        if endpoint in ("config", "certificates"):
            return self._config_answer(endpoint, path, headers)
        return self._health_answer(headers, raw)

    # What the goal state's URLs lead to.  waagent fetches all but FullConfig before
    # it reports (WireProtocol.detect -> GoalState.fetch_full_goal_state) and fails
    # on a 404.  Shapes of WALinuxAgent's tests/data/wire/hosting_env.xml and
    # shared_config.xml, cut to what agents read; no extensions and no certificates
    # (a CertificateFile without <Data>) for this VM.
    CONFIG_DOCUMENTS = {
        "hostingEnvironmentConfig":
            '<HostingEnvironmentConfig version="1.0.0.0" goalStateIncarnation="{incarnation}">\n'
            '  <Deployment name="{deployment}" incarnation="0" />\n'
            '  <Incarnation number="1" instance="{role}" />\n'
            '  <Role name="{role}" />\n'
            '</HostingEnvironmentConfig>',
        "sharedConfig":
            '<SharedConfig version="1.0.0.0" goalStateIncarnation="{incarnation}">\n'
            '  <Deployment name="{deployment}" incarnation="0" />\n'
            '  <Incarnation number="1" instance="{role}" />\n'
            '  <Role name="{role}" settleTimeSeconds="0" />\n'
            '</SharedConfig>',
        "extensionsConfig":
            '<?xml version="1.0" encoding="utf-8"?>\n'
            '<Extensions version="1.0.0.0" goalStateIncarnation="{incarnation}">\n'
            '  <GuestAgentExtension xmlns:i="http://www.w3.org/2001/XMLSchema-instance">\n'
            '    <GAFamilies />\n'
            '  </GuestAgentExtension>\n'
            '  <Plugins />\n'
            '  <PluginSettings />\n'
            '</Extensions>',
        "certificates":
            '<?xml version="1.0" encoding="utf-8"?>\n'
            '<CertificateFile>\n'
            '  <Version>2012-11-30</Version>\n'
            '  <Incarnation>{incarnation}</Incarnation>\n'
            '  <Format>Pkcs7BlobWithPfxContents</Format>\n'
            '</CertificateFile>',
    }

    def _config_answer(self, endpoint, path, headers):
        url = urlsplit(path)
        with self._lock:
            here = "/machine/%s/%s" % (quote(self.container_id, safe=""),
                                       _azure_url_quote(self.instance_id))
            incarnation = self._incarnation
        if url.path != here:
            return Reply(404, "Not found\n")
        name = parse_qs(url.query).get("type", [""])[0] if endpoint == "config" else endpoint
        if name not in self.CONFIG_DOCUMENTS:
            return Reply(404, "Not found\n")
        if endpoint == "certificates" and not headers.get("x-ms-guest-agent-public-x509-cert"):
            # they are encrypted to this certificate (the agents send it)
            return Reply(400, "Missing x-ms-guest-agent-public-x509-cert header\n")
        # the role instance's name: what follows the first dot of its id
        role = self.instance_id.split(".", 1)[-1]
        return Reply(200, self.CONFIG_DOCUMENTS[name].format(
            incarnation=incarnation, role=xml_escape(role, {'"': "&quot;"}),
            deployment=xml_escape(self.container_id, {'"': "&quot;"})),
            "text/xml; charset=utf-8")

    def _render_goal_state(self, with_role_instances):
        text = self._goal_state_template.format(
            incarnation=self._incarnation,
            container_id=xml_escape(self.container_id),
            instance_id=xml_escape(self.instance_id),
            container_url=xml_escape(quote(self.container_id, safe="")),
            instance_url=xml_escape(_azure_url_quote(self.instance_id)),
            base_url=self.advertised_wireserver or self._wire.addr)
        return text if with_role_instances else strip_role_instance_list(text)

    def _serve_goal_state(self):
        with self._lock:
            self._goal_states_served += 1
            served = self._goal_states_served
            if self.goal_state_body is not None:
                body = self.goal_state_body
            else:
                body = self._render_goal_state(served > self.no_role_instance_for)
            if self.bump_incarnation_after is not None and served == self.bump_incarnation_after:
                self._incarnation += 1
        return body

    def _health_answer(self, headers, raw):
        content_type = headers.get("content-type", "")
        if content_type.split(";")[0].strip().lower() != "text/xml":
            return Reply(400, "Content-Type must be text/xml\n")
        try:
            report = parse_health_report(raw)
        except ValueError as e:
            return Reply(400, "Bad health report: %s\n" % e)
        with self._lock:
            status, message = self._judge_health(report)
            report["status"] = status
            report["time"] = time.time()
            del report["root"]
            self._health_reports.append(report)
            self._write_record(dict(report, type="health"))
        return Reply(status, message + "\n")

    def _judge_health(self, report):
        """(status, message) for a parsed report.  Caller holds self._lock."""
        if report["root"] != "Health":
            return 400, "root element must be <Health>"
        if not isinstance(report["incarnation"], int):
            return 400, "GoalStateIncarnation missing or not a number"
        if report["incarnation"] != self._incarnation:
            return 410, "Gone: incarnation %s is not the current one" % report["incarnation"]
        if report["container_id"] != self.container_id:
            return 400, "unknown ContainerId"
        if report["instance_id"] != self.instance_id:
            return 400, "unknown InstanceId"
        if report["state"] not in ("Ready", "NotReady"):
            return 400, "State must be Ready or NotReady"
        if len(report["description"] or "") > MAX_DESCRIPTION_CHARS:
            return 500, "Internal Server Error"
        return 200, "OK"

    # -- IMDS --------------------------------------------------------------

    def _imds_answer(self, method, path, headers):
        def error(status, message, versions=None):
            return Reply(status, imds_error(message, versions),
                         "application/json; charset=utf-8")

        if "x-forwarded-for" in headers:
            return error(403, "Forbidden. Requests with X-Forwarded-For are not accepted")
        if headers.get("metadata", "").strip().lower() != "true":
            return error(400, "Bad request. Required metadata header not specified")
        url = urlsplit(path)
        query = parse_qs(url.query)
        parts = [p for p in url.path.split("/") if p]
        if parts[:2] != ["metadata", "instance"]:
            return error(404, "Not found")
        if method != "GET":
            return error(405, "Method not allowed")
        newest = self.imds_api_versions or self._imds_sample_versions
        api_version = query.get("api-version", [""])[0]
        if not api_version:
            return error(400, "Bad request. api-version was not specified in the request. "
                         "For more information refer to aka.ms/azureimds", newest)
        if self.imds_api_versions is not None and api_version not in self.imds_api_versions:
            return error(400, "Bad request. api-version is invalid or was not specified in "
                         "the request. For more information refer to aka.ms/azureimds",
                         sorted(self.imds_api_versions, reverse=True))
        return self._imds_leaf(parts[2:], query.get("format", ["json"])[0], error,
                               has_user_data(api_version))

    def _imds_leaf(self, keys, fmt, error, user_data=True):
        if self.imds_body is not None and not keys:
            return Reply(200, self.imds_body, "application/json; charset=utf-8")
        node = self._imds_doc_user_data if user_data else self._imds_doc
        for key in keys:
            if isinstance(node, dict) and key in node:
                node = node[key]
            elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
                node = node[int(key)]
            else:
                return error(404, "Not found")
        if fmt == "text":
            if isinstance(node, (dict, list)):
                return error(400, "Bad request. Text format is only supported for leaf nodes")
            return Reply(200, str(node), "text/plain; charset=utf-8")
        if fmt != "json":
            return error(400, "Bad request. Unsupported format %s" % fmt)
        # The real service answers compact JSON.
        return Reply(200, json.dumps(node, separators=(",", ":")),
                     "application/json; charset=utf-8")


# ---------------------------------------------------------------------------
# Summaries (run / demo / serve)
# ---------------------------------------------------------------------------

def _request_line(r):
    answer = r["status"] or "no answer"
    fault = " (fault: %s)" % r["fault"] if r["fault"] else ""
    return "%-10s %-4s %s -> %s%s" % (r["server"], r["method"], r["path"], answer, fault)


def summarize(az, limit=40):
    requests = az.requests
    counts = collections.Counter(r["server"] for r in requests)
    lines = ["%d request(s): wireserver %d, imds %d"
             % (len(requests), counts["wireserver"], counts["imds"])]
    shown = requests if len(requests) <= limit else requests[-limit:]
    if len(shown) < len(requests):
        lines.append("  ... %d earlier request(s) not shown" % (len(requests) - len(shown)))
    for r in shown:
        lines.append("  " + _request_line(r))
    reports = az.health_reports
    lines.append("%d health report(s)" % len(reports))
    for r in reports:
        details = ""
        if r["substatus"] or r["description"]:
            details = " %s: %s" % (r["substatus"], (r["description"] or "")[:200])
        lines.append("  %s incarnation %s -> %d%s" % (r["state"], r["incarnation"],
                                                      r["status"], details))
    lines.append("Ready accepted: %s" % ("yes" if az.ready_accepted() else "no"))
    return lines


def _print_lines(lines, stream, prefix="fake_azure: "):
    for line in lines:
        stream.write(prefix + line + "\n")
    stream.flush()


# ---------------------------------------------------------------------------
# demo: the provisioner in a private user+UTS+mount namespace
# ---------------------------------------------------------------------------

DEMO_HOSTNAME = "demo-vm-1"
TEMPLATE_HOSTNAME = "image-template"
DEMO_HOSTS = ("127.0.0.1\tlocalhost\n127.0.1.1\t%s\n\n"
              "# The following lines are desirable for IPv6 capable hosts\n"
              "::1     localhost ip6-localhost ip6-loopback\n"
              "ff02::1 ip6-allnodes\nff02::2 ip6-allrouters\n" % TEMPLATE_HOSTNAME)
UNSHARE = ["unshare", "--user", "--map-root-user", "--uts", "--mount"]

# Runs inside the namespace.  Every step must succeed before the command runs,
# and the marker file proves /etc is our copy: the real /etc is never written.
DEMO_WRAPPER = r"""
set -e
etc="$1"; state="$2"; py="$3"; shift 3
mount --bind "$etc" /etc
test -e /etc/.fake-azure-demo
# the provisioner keeps its record in /var/lib, and on an Azure VM the host reads
# the KVP pool there: both go to an empty /var/lib of the demo's own (with an empty
# hyperv/ where the machine has one, so that the KVP report is still written)
hyperv=; [ -d /var/lib/hyperv ] && hyperv=yes
mount -t tmpfs -o mode=0755 fake-azure-demo-var-lib /var/lib
if [ -n "$hyperv" ]; then mkdir /var/lib/hyperv; fi
"$py" -c 'import socket, sys; socket.sethostname(sys.argv[1])' "$(cat /etc/hostname)"
uname -n > "$state/hostname.before"
set +e
"$@"
code=$?
uname -n > "$state/hostname.after"
exit $code
"""


def make_private_etc(parent):
    etc = os.path.join(parent, "etc")
    os.mkdir(etc)
    with open(os.path.join(etc, "hostname"), "w") as f:
        f.write(TEMPLATE_HOSTNAME + "\n")
    with open(os.path.join(etc, "hosts"), "w") as f:
        f.write(DEMO_HOSTS)
    open(os.path.join(etc, ".fake-azure-demo"), "w").close()
    # So that user lookups and the dynamic linker work as usual inside.
    for name in ("passwd", "group", "nsswitch.conf", "ld.so.cache", "ld.so.conf"):
        try:
            shutil.copy(os.path.join("/etc", name), etc)
        except (IOError, OSError):
            pass
    return etc


def namespace_problem():
    """None when an unprivileged user+UTS+mount namespace with a bind mount
    works here, else why not."""
    if shutil.which("unshare") is None:
        return "unshare(1) not found"
    probe_dir = tempfile.mkdtemp(prefix="fake-azure-probe-")
    try:
        probe = subprocess.Popen(UNSHARE + ["sh", "-c", 'mount --bind "$1" "$1"', "sh",
                                            probe_dir],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 universal_newlines=True)
        out = probe.communicate(timeout=10)[0]
    except (OSError, subprocess.TimeoutExpired) as e:
        return "unshare failed: %s" % e
    finally:
        os.rmdir(probe_dir)
    if probe.returncode != 0:
        return "%s: %s" % (" ".join(UNSHARE), out.strip() or "exit %d" % probe.returncode)
    return None


def _read(path):
    try:
        with open(path) as f:
            return f.read()
    except (IOError, OSError):
        return None


def _show_file(label, text, out):
    out.write("%s:\n" % label)
    if text is None:
        out.write("    (missing)\n")
    for line in (text or "").splitlines():
        out.write(("    " + line).rstrip() + "\n")


def run_demo(script, timeout, out, use_namespace=True):
    if not os.path.exists(script):
        out.write("demo: %s not found\n" % script)
        return 2
    problem = namespace_problem() if use_namespace else "--no-namespace given"
    scratch = tempfile.mkdtemp(prefix="fake-azure-demo-")
    try:
        with FakeAzure(computer_name=DEMO_HOSTNAME) as az:
            provisioner = [sys.executable, script, "--wireserver", az.wireserver_addr,
                           "--imds", az.imds_addr, "-v"]
            out.write("demo: emulator at wireserver %s imds %s, computerName %r\n"
                      % (az.wireserver_addr, az.imds_addr, DEMO_HOSTNAME))
            if problem:
                out.write("demo: cannot make a private namespace (%s); running with "
                          "--no-hostname\n" % problem)
                command = provisioner + ["--no-hostname"]
            else:
                etc = make_private_etc(scratch)
                before = dict((n, _read(os.path.join(etc, n))) for n in ("hostname", "hosts"))
                out.write("demo: in a private user+UTS+mount namespace with a private /etc\n")
                command = UNSHARE + ["sh", "-c", DEMO_WRAPPER, "sh", etc, scratch,
                                     sys.executable] + provisioner
            out.write("demo: $ %s\n" % " ".join(command if problem else provisioner))
            out.flush()
            code = _run_command(command, timeout)
            out.write("demo: provisioner exited with %d\n" % code)
            if not problem:
                _report_namespace(scratch, before, out)
            _print_lines(summarize(az), out, prefix="demo: ")
            return code
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _report_namespace(scratch, before, out):
    etc = os.path.join(scratch, "etc")
    out.write("demo: namespace hostname before: %s\n"
              % (_read(os.path.join(scratch, "hostname.before")) or "?\n").strip())
    out.write("demo: namespace hostname after:  %s\n"
              % (_read(os.path.join(scratch, "hostname.after")) or "?\n").strip())
    for name in ("hostname", "hosts"):
        _show_file("demo: /etc/%s before" % name, before[name], out)
        _show_file("demo: /etc/%s after" % name, _read(os.path.join(etc, name)), out)
    out.flush()


def _run_command(command, timeout):
    """Run command with inherited stdio; its exit code (128+signal when killed,
    124 on timeout, 127 when it cannot be started)."""
    try:
        process = subprocess.Popen(command)
    except OSError as e:
        sys.stderr.write("fake_azure: cannot run %s: %s\n" % (command[0], e))
        return 127
    try:
        code = process.wait(timeout=timeout or None)
    except subprocess.TimeoutExpired:
        sys.stderr.write("fake_azure: %s still running after %s s: killed\n"
                         % (command[0], timeout))
        process.kill()
        process.wait()
        return 124
    except KeyboardInterrupt:
        process.kill()
        process.wait()
        return 130
    return 128 - code if code < 0 else code


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def _faults_arg(text):
    try:
        return parse_fault_list(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))


def _versions_arg(text):
    return [v.strip() for v in text.split(",") if v.strip()]


def add_emulator_options(parser):
    vm = parser.add_argument_group("emulated VM")
    vm.add_argument("--host", default="127.0.0.1",
                    help="address to listen on (default: %(default)s)")
    vm.add_argument("--wireserver-port", type=int, default=0, metavar="PORT",
                    help="WireServer port (default: any free port)")
    vm.add_argument("--imds-port", type=int, default=0, metavar="PORT",
                    help="IMDS port (default: any free port)")
    vm.add_argument("--computer-name", default="web-7", metavar="NAME",
                    help="compute.osProfile.computerName (default: %(default)s)")
    vm.add_argument("--vm-name", metavar="NAME",
                    help="compute.name (default: the computer name)")
    vm.add_argument("--no-os-profile", action="store_true",
                    help="leave osProfile out of the instance document")
    vm.add_argument("--admin-username", default="azureuser", metavar="USER",
                    help="compute.osProfile.adminUsername (default: %(default)s)")
    vm.add_argument("--public-key", action="append", metavar="KEYDATA",
                    help="an entry of compute.publicKeys (repeatable; default: one fake key)")
    vm.add_argument("--vm-id", default=DEFAULT_VM_ID, metavar="UUID",
                    help="compute.vmId")
    vm.add_argument("--incarnation", type=int, default=1, metavar="N",
                    help="goal-state incarnation (default: %(default)s)")
    vm.add_argument("--container-id", default=DEFAULT_CONTAINER_ID, metavar="ID",
                    help="goal-state ContainerId")
    vm.add_argument("--instance-id", metavar="ID",
                    help="goal-state InstanceId (default: VMID._VMNAME)")
    vm.add_argument("--imds-api-versions", type=_versions_arg, metavar="V[,V...]",
                    help="accept only these IMDS api-versions (others get 400)")
    vm.add_argument("--goal-state-file", metavar="FILE",
                    help="serve this file verbatim as the goal state")
    vm.add_argument("--imds-file", metavar="FILE",
                    help="serve this file verbatim as the instance document")
    vm.add_argument("--user-data", metavar="FILE",
                    help="compute.userData: this file's bytes, base64 (default: \"\")")

    faults = parser.add_argument_group(
        "faults",
        "FAULTS is a comma-separated list applied to successive requests; once it\n"
        "is used up the server behaves normally. Items: CODE (answer that status,\n"
        "e.g. 503), CODE:SECONDS (that status with a Retry-After header), reset\n"
        "(close the connection without answering), delay:SECONDS (then answer).")
    faults.add_argument("--wire-faults", type=_faults_arg, metavar="FAULTS",
                        help="for every WireServer request")
    faults.add_argument("--imds-faults", type=_faults_arg, metavar="FAULTS",
                        help="for every IMDS request")
    faults.add_argument("--goalstate-faults", type=_faults_arg, metavar="FAULTS",
                        help="for goal-state GETs only")
    faults.add_argument("--health-faults", type=_faults_arg, metavar="FAULTS",
                        help="for health POSTs only")
    faults.add_argument("--no-role-instance-for", type=int, default=0, metavar="N",
                        help="the first N goal states have no RoleInstanceList")
    faults.add_argument("--bump-incarnation-after", type=int, metavar="N",
                        help="raise the incarnation after serving the N-th goal state")
    faults.add_argument("--wireserver-up-after", type=float, default=0.0, metavar="SECONDS",
                        help="WireServer port refuses connections for this long")
    faults.add_argument("--imds-down", action="store_true",
                        help="IMDS port refuses connections the whole time")

    output = parser.add_argument_group("output")
    output.add_argument("--record", metavar="FILE",
                        help="append every request and health report to FILE as JSON lines")


def emulator_kwargs(args):
    bodies = {}
    for name, path in (("goal_state_body", args.goal_state_file),
                       ("imds_body", args.imds_file)):
        if path:
            with open(path, "rb") as f:
                bodies[name] = f.read().decode("utf-8", "replace")
    if args.user_data:
        with open(args.user_data, "rb") as f:
            bodies["user_data"] = f.read()
    return dict(bodies,
        host=args.host, wireserver_port=args.wireserver_port, imds_port=args.imds_port,
        computer_name=args.computer_name, vm_name=args.vm_name,
        os_profile=not args.no_os_profile, incarnation=args.incarnation,
        container_id=args.container_id, instance_id=args.instance_id,
        admin_username=args.admin_username, public_keys=args.public_key,
        imds_api_versions=args.imds_api_versions, wire_faults=args.wire_faults,
        imds_faults=args.imds_faults, goalstate_faults=args.goalstate_faults,
        health_faults=args.health_faults,
        no_role_instance_for=args.no_role_instance_for,
        bump_incarnation_after=args.bump_incarnation_after,
        wireserver_up_after=args.wireserver_up_after, imds_down=args.imds_down,
        vm_id=args.vm_id, record_file=args.record)


def build_parser():
    parser = argparse.ArgumentParser(
        prog="fake_azure.py",
        description="Azure WireServer + IMDS emulator for testing provisioning agents. "
                    "Listens on 127.0.0.1 only unless told otherwise.",
        epilog="examples:\n"
               "  fake_azure.py serve --computer-name web-7\n"
               "  fake_azure.py run --wire-faults 503,reset -- \\\n"
               "      python3 azure_provisioning.py --wireserver {wireserver} --imds {imds}\n"
               "  fake_azure.py demo",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = commands.add_parser(
        "serve", help="serve until SIGTERM/SIGINT",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Start the emulator, print 'wireserver HOST:PORT imds HOST:PORT' on\n"
                    "stdout when it is ready, and serve until SIGTERM or SIGINT. Each\n"
                    "request is logged to stderr; a summary is printed on exit.")
    add_emulator_options(serve)
    serve.add_argument("-q", "--quiet", action="store_true",
                       help="do not log each request to stderr")

    run = commands.add_parser(
        "run", help="run a command against the emulator",
        usage="fake_azure.py run [options] -- CMD [ARG ...]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Start the emulator and run CMD, with {wireserver} and {imds} in its\n"
                    "arguments replaced by the emulator's HOST:PORT addresses (they are\n"
                    "also in $FAKE_AZURE_WIRESERVER and $FAKE_AZURE_IMDS). Then print a\n"
                    "summary of the requests and health reports seen to stderr and exit\n"
                    "with CMD's exit code.")
    add_emulator_options(run)
    run.add_argument("--timeout", type=float, default=0, metavar="SECONDS",
                     help="kill CMD after this long and exit 124 (default: no limit)")
    run.add_argument("-v", "--verbose", action="store_true",
                     help="log each request to stderr as it happens")
    run.add_argument("cmd", nargs=argparse.REMAINDER, metavar="CMD", help=argparse.SUPPRESS)

    demo = commands.add_parser(
        "demo", help="run azure_provisioning.py against the emulator",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run the repository's azure_provisioning.py against an emulator whose\n"
                    "computerName is %r. When an unprivileged user+UTS+mount namespace\n"
                    "can be made, it runs there over a private /etc whose hostname is\n"
                    "%r and an empty /var/lib, so the hostname really changes -\n"
                    "inside the namespace only; otherwise it runs with --no-hostname.\n"
                    "Needs no root; never touches this machine's /etc, /var/lib or\n"
                    "hostname. Prints the hostname and /etc files before and after,\n"
                    "and the requests the emulator saw."
                    % (DEMO_HOSTNAME, TEMPLATE_HOSTNAME))
    demo.add_argument("--script", default=os.path.join(REPO_DIR, "azure_provisioning.py"),
                      metavar="FILE", help="provisioner to run (default: the repo's)")
    demo.add_argument("--timeout", type=float, default=120, metavar="SECONDS",
                      help="kill it after this long (default: %(default)s)")
    demo.add_argument("--no-namespace", action="store_true",
                      help="do not try a namespace: run with --no-hostname")

    # parsed by tests/boot_kit.py (main hands it the arguments): listed here for --help
    commands.add_parser("boot", add_help=False,
                        help="boot a disk image under QEMU as an Azure VM against the "
                             "emulator: Ready or why not (boot --help)")

    media = commands.add_parser(
        "media", help="write provisioning media (ovf-env.xml on a disc image)",
        # no abbreviations: "--password X" must not become "--password-file X"
        allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write the disc Azure attaches at a VM's first boot: ovf-env.xml at\n"
                    "its root, UDF bridged with ISO 9660 (needs genisoimage). The\n"
                    "password is read from a file or stdin, never from the command line.\n"
                    "The output file is created readable by its owner only.",
        epilog="example:\n"
               "  printf %s 'S3cret!' | fake_azure.py media --out media.iso \\\n"
               "      --user alice --password-file - --disable-ssh-password-auth false")
    media.add_argument("--out", required=True, metavar="FILE",
                       help="the disc image to write (the XML with --ovf-only)")
    media.add_argument("--hostname", default="web-7", metavar="NAME",
                       help="HostName (default: %(default)s)")
    media.add_argument("--user", default="azureuser", metavar="USER",
                       help="UserName (default: %(default)s)")
    media.add_argument("--password-file", metavar="FILE",
                       help="UserPassword: FILE's content less a final newline; "
                            "- reads stdin (default: no UserPassword)")
    media.add_argument("--password", nargs="?", action=_RefusePassword, help=argparse.SUPPRESS)
    media.add_argument("--disable-ssh-password-auth", type=_bool_arg, default=True,
                       metavar="true|false", help="DisableSshPasswordAuthentication "
                                                  "(default: true)")
    media.add_argument("--public-key", action="append", default=[], metavar="KEYDATA",
                       help="an SSH public key line (repeatable; default: none)")
    media.add_argument("--custom-data", metavar="FILE",
                       help="CustomData: this file's bytes, base64 (default: none)")
    media.add_argument("--provision-guest-agent", action="store_true",
                       help="ProvisionGuestAgent true (default: false)")
    media.add_argument("--ovf-only", action="store_true",
                       help="write ovf-env.xml itself instead of a disc image")
    return parser


class _RefusePassword(argparse.Action):
    """--password VALUE: refused, without repeating VALUE."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error("--password is not accepted (a command line is visible to every "
                     "user): use --password-file FILE, or --password-file - for stdin")


def _bool_arg(text):
    value = text.strip().lower()
    if value not in ("true", "false"):
        raise argparse.ArgumentTypeError("expected true or false, not %r" % text)
    return value == "true"


def read_password(source, stdin=None):
    """The password in file source ("-": stdin): its whole content less one final
    line end (so `echo pw > file` works; inner newlines are kept)."""
    if source == "-":
        stream = stdin if stdin is not None else sys.stdin.buffer
        data = stream.read()
    else:
        with open(source, "rb") as f:
            data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("the password in %s is not UTF-8"
                         % ("stdin" if source == "-" else source))
    for end in ("\r\n", "\n"):
        if text.endswith(end):
            return text[:-len(end)]
    return text


def cmd_serve(args):
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with FakeAzure(verbose=not args.quiet, **emulator_kwargs(args)) as az:
        sys.stdout.write("wireserver %s imds %s\n" % (az.wireserver_addr, az.imds_addr))
        sys.stdout.flush()
        while not stop.wait(0.2):
            pass
        _print_lines(summarize(az), sys.stderr)
    return 0


def cmd_run(args):
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        sys.stderr.write("fake_azure.py run: error: a command is needed after --\n")
        return 2
    with FakeAzure(verbose=args.verbose, **emulator_kwargs(args)) as az:
        def expand(arg):
            return arg.replace("{wireserver}", az.wireserver_addr).replace(
                "{imds}", az.imds_addr)
        os.environ["FAKE_AZURE_WIRESERVER"] = az.wireserver_addr
        os.environ["FAKE_AZURE_IMDS"] = az.imds_addr
        code = _run_command([expand(a) for a in cmd], args.timeout)
        lines = summarize(az) + ["command exited with %d" % code]
    _print_lines(lines, sys.stderr)
    return code


def cmd_media(args):
    password = None
    if args.password_file is not None:
        password = read_password(args.password_file)
    custom_data = None
    if args.custom_data is not None:
        with open(args.custom_data, "rb") as f:
            custom_data = f.read()
    text = make_ovf_env(args.hostname, args.user, password=password,
                        disable_ssh_password_auth=args.disable_ssh_password_auth,
                        public_keys=args.public_key, custom_data=custom_data,
                        provision_guest_agent=args.provision_guest_agent)
    if args.ovf_only:
        _write_private(args.out, text.encode("utf-8"))
        sys.stdout.write("wrote %s (%s)\n" % (args.out, OVF_ENV_NAME))
        return 0
    try:
        build_media(args.out, text)
    except RuntimeError as e:       # genisoimage failed
        sys.stderr.write("fake_azure: %s\n" % e)
        return 1
    sys.stdout.write("wrote %s (UDF + ISO 9660 disc holding /%s)\n" % (args.out, OVF_ENV_NAME))
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["boot"]:
        # QEMU and the boot test's pieces: loaded only for this command
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import boot_kit
        return boot_kit.main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "run":
            return cmd_run(args)
        if args.command == "media":
            return cmd_media(args)
        return run_demo(args.script, args.timeout, sys.stdout,
                        use_namespace=not args.no_namespace)
    except (OSError, ValueError) as e:
        sys.stderr.write("fake_azure: %s\n" % e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
