"""Tests of the emulator's provisioning media (make_ovf_env, build_media, the
`media` command) and of compute.userData in its IMDS instance document.

Needs no installs: what needs genisoimage/isoinfo, root or a filesystem driver
is skipped with the reason printed.  Servers listen on 127.0.0.1 only; every
child process is bounded in time."""

import base64
import http.client
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import unittest
import xml.parsers.expat
from unittest import mock

from tests import fake_azure
from tests.fake_azure import FakeAzure, build_media, make_ovf_env
from tests.support import is_root, shielded, skip

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "fake_azure.py")
CHILD_TIMEOUT = 60

OVF_NS = "http://schemas.dmtf.org/ovf/environment/1"
WA_NS = "http://schemas.microsoft.com/windowsazure"
KEYS = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeKeyOne alice@laptop",
        "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABFakeKeyTwo== alice@desk"]
# every XML-special character, a CDATA end, CR/LF/tab, non-ASCII
NASTY_PASSWORD = "p<a&s>s\"w'o]]>rd\r\n\t\u00e9\u20ac"
BINARY = bytes(range(256)) + b"#cloud-config\r\n\x00\xff"

# Element paths of WALinuxAgent's real tests/data/ovf-env.xml in document order
# (its KeyPairs, which need a certificate, left out).
REAL_SHAPE = [
    "Environment",
    "Environment/ProvisioningSection",
    "Environment/ProvisioningSection/Version",
    "Environment/ProvisioningSection/LinuxProvisioningConfigurationSet",
    "Environment/ProvisioningSection/LinuxProvisioningConfigurationSet/ConfigurationSetType",
    "Environment/ProvisioningSection/LinuxProvisioningConfigurationSet/HostName",
    "Environment/ProvisioningSection/LinuxProvisioningConfigurationSet/UserName",
    "Environment/ProvisioningSection/LinuxProvisioningConfigurationSet/UserPassword",
    "Environment/ProvisioningSection/LinuxProvisioningConfigurationSet/"
    "DisableSshPasswordAuthentication",
    "Environment/ProvisioningSection/LinuxProvisioningConfigurationSet/SSH",
    "Environment/ProvisioningSection/LinuxProvisioningConfigurationSet/SSH/PublicKeys",
    "Environment/ProvisioningSection/LinuxProvisioningConfigurationSet/SSH/PublicKeys/PublicKey",
    "Environment/ProvisioningSection/LinuxProvisioningConfigurationSet/SSH/PublicKeys/PublicKey/"
    "Fingerprint",
    "Environment/ProvisioningSection/LinuxProvisioningConfigurationSet/SSH/PublicKeys/PublicKey/"
    "Path",
    "Environment/ProvisioningSection/LinuxProvisioningConfigurationSet/SSH/PublicKeys/PublicKey/"
    "Value",
    "Environment/ProvisioningSection/LinuxProvisioningConfigurationSet/CustomData",
    "Environment/PlatformSettingsSection",
    "Environment/PlatformSettingsSection/Version",
    "Environment/PlatformSettingsSection/PlatformSettings",
    "Environment/PlatformSettingsSection/PlatformSettings/KmsServerHostname",
    "Environment/PlatformSettingsSection/PlatformSettings/ProvisionGuestAgent",
    "Environment/PlatformSettingsSection/PlatformSettings/GuestAgentPackageName",
    "Environment/PlatformSettingsSection/PlatformSettings/RetainWindowsPEPassInUnattend",
    "Environment/PlatformSettingsSection/PlatformSettings/RetainOfflineServicingPassInUnattend",
    "Environment/PlatformSettingsSection/PlatformSettings/PreprovisionedVm",
]
LPCS = "Environment/ProvisioningSection/LinuxProvisioningConfigurationSet/"
SETTINGS = "Environment/PlatformSettingsSection/PlatformSettings/"


def parse_ovf(text):
    """[(path of local names, namespace, text)] in document order, by expat."""
    parser = xml.parsers.expat.ParserCreate(namespace_separator="}")
    stack, found, texts = [], [], []

    def start(name, attrs):
        namespace, _, local = name.rpartition("}")
        stack.append(local)
        found.append(["/".join(stack), namespace, None])
        texts.append((len(found) - 1, []))

    def end(name):
        index, parts = texts.pop()
        found[index][2] = "".join(parts)
        stack.pop()

    def data(chunk):
        texts[-1][1].append(chunk)

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = data
    parser.Parse(text.encode("utf-8"), True)
    return [tuple(f) for f in found]


def values(parsed, path):
    return [t for p, _, t in parsed if p == path]


def run(command, stdin_bytes=None, env=None, timeout=CHILD_TIMEOUT):
    """(exit code, stdout bytes, stderr bytes); the whole session is killed at the
    time limit."""
    process = subprocess.Popen(shielded(command), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=env, start_new_session=True,
                               stdin=subprocess.DEVNULL if stdin_bytes is None
                               else subprocess.PIPE)
    try:
        out, err = process.communicate(stdin_bytes, timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        process.communicate()
        raise AssertionError("%s did not finish in %d s" % (command, timeout))
    return process.returncode, out, err


def run_cli(*args, **kwargs):
    return run([sys.executable, SCRIPT] + list(args), **kwargs)


class OvfEnv(unittest.TestCase):
    def test_every_field_and_the_real_shape(self):
        text = make_ovf_env("web-7", "alice", password=NASTY_PASSWORD,
                            disable_ssh_password_auth=False, public_keys=KEYS,
                            custom_data=BINARY, provision_guest_agent=True)
        self.assertTrue(text.startswith('<?xml version="1.0" encoding="utf-8"?>\n'))
        parsed = parse_ovf(text)
        # one PublicKey per key, otherwise exactly the real document's elements
        shape = [p for p, _, _ in parsed]
        key = LPCS + "SSH/PublicKeys/PublicKey"
        first = shape.index(key)
        self.assertEqual(shape[first:first + 4], shape[first + 4:first + 8])
        self.assertEqual(shape[:first + 4] + shape[first + 8:], REAL_SHAPE)

        namespaces = dict((p, ns) for p, ns, _ in parsed)
        self.assertEqual(namespaces["Environment"], OVF_NS)
        for path, namespace in namespaces.items():
            if path != "Environment":
                self.assertEqual(namespace, WA_NS, path)

        self.assertEqual(values(parsed, LPCS + "ConfigurationSetType"),
                         ["LinuxProvisioningConfiguration"])
        self.assertEqual(values(parsed, LPCS + "HostName"), ["web-7"])
        self.assertEqual(values(parsed, LPCS + "UserName"), ["alice"])
        self.assertEqual(values(parsed, LPCS + "UserPassword"), [NASTY_PASSWORD])
        self.assertEqual(values(parsed, LPCS + "DisableSshPasswordAuthentication"), ["false"])
        self.assertEqual(values(parsed, key + "/Value"), KEYS)
        self.assertEqual(values(parsed, key + "/Path"),
                         ["/home/alice/.ssh/authorized_keys"] * 2)
        fingerprints = values(parsed, key + "/Fingerprint")
        self.assertEqual(len(set(fingerprints)), 2)
        for fingerprint in fingerprints:
            self.assertRegex(fingerprint, r"^[0-9A-F]{40}$")
        custom = values(parsed, LPCS + "CustomData")
        self.assertEqual(base64.b64decode(custom[0].encode("ascii"), validate=True), BINARY)
        self.assertEqual(values(parsed, SETTINGS + "ProvisionGuestAgent"), ["true"])
        self.assertEqual(values(parsed, SETTINGS + "PreprovisionedVm"), ["false"])

    def test_every_value_is_escaped(self):
        text = make_ovf_env("h<1>&", "u&<x>", password="", public_keys=["k <&> v"])
        parsed = parse_ovf(text)
        self.assertEqual(values(parsed, LPCS + "HostName"), ["h<1>&"])
        self.assertEqual(values(parsed, LPCS + "UserName"), ["u&<x>"])
        self.assertEqual(values(parsed, LPCS + "UserPassword"), [""])
        self.assertEqual(values(parsed, LPCS + "SSH/PublicKeys/PublicKey/Value"), ["k <&> v"])
        self.assertEqual(values(parsed, LPCS + "SSH/PublicKeys/PublicKey/Path"),
                         ["/home/u&<x>/.ssh/authorized_keys"])

    def test_defaults_leave_optional_fields_out(self):
        parsed = parse_ovf(make_ovf_env("web-7", "alice"))
        paths = [p for p, _, _ in parsed]
        for absent in ("UserPassword", "SSH", "CustomData"):
            self.assertNotIn(LPCS + absent, paths)
        self.assertEqual(values(parsed, LPCS + "DisableSshPasswordAuthentication"), ["true"])
        self.assertEqual(values(parsed, SETTINGS + "ProvisionGuestAgent"), ["false"])
        # empty custom data is still there, empty
        parsed = parse_ovf(make_ovf_env("web-7", "alice", custom_data=b""))
        self.assertEqual(values(parsed, LPCS + "CustomData"), [""])

    def test_what_xml_cannot_carry_is_refused(self):
        for bad in ("pw\x00", "pw\x1b", "\ufffe"):
            with self.assertRaises(ValueError):
                make_ovf_env("web-7", "alice", password=bad)
        with self.assertRaises(ValueError):
            make_ovf_env("web\x01", "alice")
        with self.assertRaises(TypeError):
            make_ovf_env("web-7", "alice", custom_data="text, not bytes")


class MediaCommand(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="fake-azure-media-test-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.out = os.path.join(self.tmp, "ovf-env.xml")

    def read_out(self):
        with open(self.out, "rb") as f:
            return f.read().decode("utf-8")

    def test_no_password_on_the_command_line(self):
        for words in (["--password", "Hunter2"], ["--password=Hunter2"], ["--password"]):
            code, out, err = run_cli("media", "--out", self.out, "--ovf-only", *words)
            self.assertEqual(code, 2, words)
            self.assertIn(b"--password-file", err)
            self.assertNotIn(b"Hunter2", err + out)
            self.assertFalse(os.path.exists(self.out))
        help_text = run_cli("media", "--help")[1]
        self.assertIn(b"--password-file", help_text)
        self.assertNotIn(b"--password ", help_text)

    def test_password_from_stdin(self):
        code, out, err = run_cli("media", "--out", self.out, "--ovf-only", "--user", "alice",
                                 "--password-file", "-",
                                 stdin_bytes=(NASTY_PASSWORD + "\n").encode("utf-8"))
        self.assertEqual((code, err), (0, b""))
        self.assertEqual(values(parse_ovf(self.read_out()), LPCS + "UserPassword"),
                         [NASTY_PASSWORD])
        # it carries a password: for its owner only
        self.assertEqual(stat.S_IMODE(os.stat(self.out).st_mode) & 0o077, 0)

    def test_every_option_matches_the_api(self):
        password_file = os.path.join(self.tmp, "pw")
        custom_file = os.path.join(self.tmp, "custom")
        with open(password_file, "wb") as f:
            f.write(b"two\nlines\r\n")     # one final line end is dropped, no more
        with open(custom_file, "wb") as f:
            f.write(BINARY)
        code, out, err = run_cli(
            "media", "--out", self.out, "--ovf-only", "--hostname", "vm-9", "--user", "bob",
            "--password-file", password_file, "--disable-ssh-password-auth", "false",
            "--public-key", KEYS[0], "--public-key", KEYS[1], "--custom-data", custom_file,
            "--provision-guest-agent")
        self.assertEqual((code, err), (0, b""))
        self.assertEqual(self.read_out(), make_ovf_env(
            "vm-9", "bob", password="two\nlines", disable_ssh_password_auth=False,
            public_keys=KEYS, custom_data=BINARY, provision_guest_agent=True))
        code, out, err = run_cli("media", "--out", self.out, "--ovf-only")
        self.assertEqual(code, 0, err)
        self.assertEqual(self.read_out(), make_ovf_env("web-7", "azureuser"))

    def test_bad_arguments(self):
        self.assertEqual(run_cli("media", "--ovf-only")[0], 2)     # no --out
        code, _, err = run_cli("media", "--out", self.out, "--disable-ssh-password-auth", "yes")
        self.assertEqual(code, 2)
        self.assertIn(b"true or false", err)
        code, _, err = run_cli("media", "--out", self.out, "--password-file",
                               os.path.join(self.tmp, "missing"))
        self.assertEqual(code, 2)
        self.assertFalse(os.path.exists(self.out))

    def test_without_genisoimage(self):
        with mock.patch.object(fake_azure.shutil, "which", return_value=None):
            with self.assertRaises(fake_azure.MissingTool) as caught:
                build_media(os.path.join(self.tmp, "m.iso"), "<x/>")
        self.assertIsInstance(caught.exception, OSError)
        self.assertIn("apt-get install genisoimage", str(caught.exception))
        # the command says the same, with nothing on PATH
        empty = os.path.join(self.tmp, "bin")
        os.mkdir(empty)
        code, out, err = run_cli("media", "--out", os.path.join(self.tmp, "m.iso"),
                                 env=dict(os.environ, PATH=empty))
        self.assertEqual(code, 2)
        self.assertIn(b"Debian package genisoimage", err)
        self.assertFalse(os.path.exists(os.path.join(self.tmp, "m.iso")))


def sectors(image, first, count):
    return [image[n * 2048:(n + 1) * 2048] for n in range(first, first + count)]


class Media(unittest.TestCase):
    """build_media's disc, read back with isoinfo and (as root) by the kernel."""

    def setUp(self):
        missing = [t for t in ("genisoimage", "isoinfo") if shutil.which(t) is None]
        if missing:
            skip(self, "%s not installed (Debian package genisoimage)" % " and ".join(missing))
        self.tmp = tempfile.mkdtemp(prefix="fake-azure-media-test-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.text = make_ovf_env("web-7", "alice", password=NASTY_PASSWORD,
                                 public_keys=KEYS, custom_data=BINARY)
        self.data = self.text.encode("utf-8")
        self.image = os.path.join(self.tmp, "media.iso")
        self.assertEqual(build_media(self.image, self.text), self.image)

    def isoinfo(self, *args):
        code, out, err = run(["isoinfo", "-i", self.image] + list(args))
        self.assertEqual(code, 0, err)
        return out

    def test_isoinfo_reads_the_exact_bytes(self):
        # Rock Ridge, Joliet and plain ISO 9660 names all lead to the same bytes
        self.assertEqual(self.isoinfo("-R", "-x", "/ovf-env.xml"), self.data)
        self.assertEqual(self.isoinfo("-J", "-x", "/ovf-env.xml"), self.data)
        self.assertEqual(self.isoinfo("-x", "/OVF_ENV.XML;1"), self.data)
        self.assertEqual(self.isoinfo("-R", "-f").split(), [b"/ovf-env.xml"])
        self.assertIn(b"Volume id: " + fake_azure.MEDIA_VOLUME_ID.encode(), self.isoinfo("-d"))
        self.assertEqual(stat.S_IMODE(os.stat(self.image).st_mode) & 0o077, 0)

    def test_udf_bridge(self):
        with open(self.image, "rb") as f:
            image = f.read()
        # UDF's volume recognition sequence follows the ISO 9660 descriptors
        # (ECMA-167 2/8.3): BEA01, NSR02 or NSR03, TEA01 at byte 1 of a sector
        ids = [s[1:6] for s in sectors(image, 16, 16)]
        self.assertIn(b"CD001", ids)
        self.assertIn(b"BEA01", ids)
        self.assertTrue(b"NSR02" in ids or b"NSR03" in ids, ids)
        self.assertIn(b"TEA01", ids)
        # both filesystems point at one copy of the file
        self.assertEqual(image.count(self.data), 1)

    def mount_and_read(self, fstype):
        if not is_root():
            skip(self, "mounting needs root (run the suite as root to check it)")
        if shutil.which("unshare") is None:
            skip(self, "unshare(1) not found")
        point = os.path.join(self.tmp, "mnt")
        os.mkdir(point)
        # a private mount namespace: the mount (and its auto-clearing loop
        # device) goes away with the process
        code, out, err = run(["unshare", "--mount", "sh", "-c",
                              'mount -t "$1" -o ro,loop "$2" "$3" && cat "$3/ovf-env.xml"',
                              "sh", fstype, self.image, point])
        if code != 0 and (b"unknown filesystem type" in err or b"loop device" in err):
            skip(self, "cannot mount %s here: %s" % (fstype, err.decode("utf-8", "replace")
                                                     .strip().splitlines()[0]))
        self.assertEqual(code, 0, err)
        return out

    def test_mounts_read_only_as_iso9660(self):
        self.assertEqual(self.mount_and_read("iso9660"), self.data)

    def test_mounts_read_only_as_udf(self):
        self.assertEqual(self.mount_and_read("udf"), self.data)


def get_imds(az, path):
    host, port = az.imds_addr.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        connection.request("GET", path, headers={"Metadata": "true"})
        response = connection.getresponse()
        return response.status, response.read().decode("utf-8")
    finally:
        connection.close()


def compute_keys(az, api_version):
    status, body = get_imds(az, "/metadata/instance?api-version=" + api_version)
    assert status == 200, (status, body)
    pairs = json.loads(body, object_pairs_hook=lambda p: p)
    return [pair for pair in pairs if pair[0] == "compute"][0][1]


class ImdsUserData(unittest.TestCase):
    def test_base64_in_the_document(self):
        with FakeAzure(user_data=BINARY) as az:
            self.assertEqual(az.imds_addr.split(":")[0], "127.0.0.1")
            encoded = base64.b64encode(BINARY).decode("ascii")
            for version in ("2021-01-01", "2021-02-01", "2023-07-01"):
                pairs = compute_keys(az, version)
                self.assertEqual(dict(pairs)["userData"], encoded, version)
            # where real documents have it, the sample's order otherwise kept
            names = [name for name, _ in pairs]
            self.assertEqual(names[names.index("userData") - 1:names.index("userData") + 2],
                             ["tags", "userData", "version"])
            with FakeAzure() as plain:
                self.assertEqual([n for n in names if n != "userData"],
                                 [n for n, _ in compute_keys(plain, "2019-06-01")])
            path = "/metadata/instance/compute/userData?api-version=2021-02-01&format=text"
            self.assertEqual(get_imds(az, path), (200, encoded))

    def test_empty_without_user_data(self):
        for kwargs in ({}, {"user_data": b""}):
            with FakeAzure(**kwargs) as az:
                self.assertEqual(dict(compute_keys(az, "2021-02-01"))["userData"], "")
                path = "/metadata/instance/compute/userData?api-version=2021-02-01&format=text"
                self.assertEqual(get_imds(az, path), (200, ""))

    def test_absent_before_2021_01_01(self):
        with FakeAzure(user_data=b"#cloud-config\n") as az:
            for version in ("2019-06-01", "2020-12-01"):
                self.assertNotIn("userData", dict(compute_keys(az, version)), version)
            path = "/metadata/instance/compute/userData?api-version=2019-06-01&format=text"
            self.assertEqual(get_imds(az, path)[0], 404)

    def test_has_user_data(self):
        for version, expected in (("2021-01-01", True), ("2021-02-01", True),
                                  ("2020-12-01", False), ("2019-06-01", False),
                                  ("latest", False), ("", False)):
            self.assertEqual(fake_azure.has_user_data(version), expected, version)

    def test_text_is_refused(self):
        with self.assertRaises(TypeError):
            FakeAzure(user_data="#cloud-config\n")

    def test_command_line_option(self):
        tmp = tempfile.mkdtemp(prefix="fake-azure-media-test-")
        self.addCleanup(shutil.rmtree, tmp, True)
        path = os.path.join(tmp, "user-data")
        with open(path, "wb") as f:
            f.write(BINARY)
        parser = fake_azure.build_parser()
        kwargs = fake_azure.emulator_kwargs(parser.parse_args(["serve", "--user-data", path]))
        self.assertEqual(kwargs["user_data"], BINARY)
        kwargs = fake_azure.emulator_kwargs(parser.parse_args(["serve"]))
        self.assertIsNone(kwargs.get("user_data"))
        for command in ("serve", "run"):
            self.assertIn(b"--user-data FILE", run_cli(command, "--help")[1])


if __name__ == "__main__":
    unittest.main()
