"""Tests of the WireServer + IMDS emulator itself (tests/fake_azure.py).

Everything talks to 127.0.0.1 only; every wait and every child process is
bounded in time."""

import http.client
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from xml.etree import ElementTree

from tests import fake_azure
from tests.fake_azure import FakeAzure
from tests.support import shielded

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "data")
SCRIPT = os.path.join(HERE, "fake_azure.py")
CHILD_TIMEOUT = 60      # seconds any child process may take

WIRE_HEADERS = {"x-ms-version": "2012-11-30", "x-ms-agent-name": "fake-azure-tests"}
HEALTH_HEADERS = dict(WIRE_HEADERS, **{"Content-Type": "text/xml;charset=utf-8"})
IMDS_PATH = "/metadata/instance?api-version=2021-02-01"

# Ids inside the real health samples in tests/data (see tests/data/SOURCES.md).
SAMPLE_IDS = {
    "walinuxagent__wire-health_ready-rendered.xml": (
        "1", "c6d5526c-5ac2-4200-b6e2-56f2b70c5ab2",
        "b61f93d0-e1ed-40b2-b067-22c243233448.MachineRole_IN_0"),
    "cloud-init__test_azure_helper-health_notready_provisioningfailed-rendered.xml": (
        "1634", "MyContainerId", "MyInstanceId"),
    "azure-docs__no-agent-python_posted_health_ready.xml": (
        "1", "7b324f53-983a-43bc-b919-1775d6077608",
        "fbb84507-46cd-4f4e-bd78-a2edaa9d059b._thstringnopa2"),
}


def sample(name):
    with open(os.path.join(DATA, name), "rb") as f:
        return f.read().decode("utf-8")


def fetch(addr, method, path, headers=None, body=None, timeout=5):
    """One request on a fresh connection: (status, headers dict, body str)."""
    host, port = addr.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        data = response.read().decode("utf-8")
        return response.status, dict((k.lower(), v) for k, v in response.getheaders()), data
    finally:
        connection.close()


def health_xml(incarnation, container_id, instance_id, state="Ready", details=""):
    return ('<?xml version="1.0" encoding="utf-8"?><Health xmlns:xsi="http://www.w3.org/2001/'
            'XMLSchema-instance" xmlns:xsd="http://www.w3.org/2001/XMLSchema">'
            '<GoalStateIncarnation>%s</GoalStateIncarnation><Container><ContainerId>%s'
            '</ContainerId><RoleInstanceList><Role><InstanceId>%s</InstanceId><Health>'
            '<State>%s</State>%s</Health></Role></RoleInstanceList></Container></Health>'
            % (incarnation, container_id, instance_id, state, details))


def post_health(az, incarnation=None, container_id=None, instance_id=None, **kwargs):
    body = health_xml(az.incarnation if incarnation is None else incarnation,
                      container_id or az.container_id, instance_id or az.instance_id,
                      **kwargs)
    return fetch(az.wireserver_addr, "POST", "/machine?comp=health", HEALTH_HEADERS, body)


def get_goal_state(az, path="/machine/?comp=goalstate"):
    return fetch(az.wireserver_addr, "GET", path, WIRE_HEADERS)


def get_imds(az, path=IMDS_PATH, headers=None):
    status, _, body = fetch(az.imds_addr, "GET", path,
                           {"Metadata": "true"} if headers is None else headers)
    return status, body


def refused(addr):
    host, port = addr.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


class GoalState(unittest.TestCase):
    def setUp(self):
        self.az = FakeAzure(computer_name="web-7", incarnation=5, container_id="c-123",
                            instance_id="i-456._web-7")
        self.addCleanup(self.az.stop)

    def test_real_shape_with_current_values(self):
        status, headers, body = get_goal_state(self.az)
        self.assertEqual(status, 200)
        self.assertTrue(headers["content-type"].startswith("text/xml"))
        root = ElementTree.fromstring(body)
        self.assertEqual(root.tag, "GoalState")
        self.assertEqual(root.findtext("Version"), "2012-11-30")
        self.assertEqual(root.findtext("Incarnation"), "5")
        self.assertEqual(root.findtext("Container/ContainerId"), "c-123")
        self.assertEqual(root.findtext("Container/RoleInstanceList/RoleInstance/InstanceId"),
                         "i-456._web-7")
        self.assertFalse(body.endswith("\n"), "the real sample has no final newline")
        # URL elements unpadded, as in captured documents (waagent takes them verbatim)
        url = root.findtext(".//HostingEnvironmentConfig")
        self.assertEqual(url, url.strip())
        self.assertIn("incarnation=5", url)
        # no URL may point at the real WireServer
        self.assertNotIn("168.63.129.16", body)
        self.assertIn(self.az.wireserver_addr, body)

    def test_both_paths(self):
        for path in ("/machine/?comp=goalstate", "/machine?comp=goalstate"):
            self.assertEqual(get_goal_state(self.az, path)[0], 200, path)
        self.assertEqual(self.az.goal_states_served, 2)

    def test_needs_x_ms_version(self):
        status = fetch(self.az.wireserver_addr, "GET", "/machine/?comp=goalstate")[0]
        self.assertEqual(status, 400)
        status = fetch(self.az.wireserver_addr, "GET", "/machine/?comp=goalstate",
                      {"x-ms-version": "2099-01-01"})[0]
        self.assertEqual(status, 400)
        self.assertEqual(self.az.goal_states_served, 0)

    def test_wrong_method_and_unknown_path(self):
        status, headers, _ = fetch(self.az.wireserver_addr, "POST", "/machine/?comp=goalstate",
                                  WIRE_HEADERS, "")
        self.assertEqual((status, headers.get("allow")), (405, "GET"))
        self.assertEqual(fetch(self.az.wireserver_addr, "GET", "/nothing", WIRE_HEADERS)[0], 404)

    def test_versions_is_the_sample(self):
        status, _, body = fetch(self.az.wireserver_addr, "GET", "/?comp=versions")
        self.assertEqual((status, body), (200, sample(fake_azure.VERSIONS_SAMPLE)))
        self.assertIn("<Version>2012-11-30</Version>", body)

    def test_body_override_is_verbatim(self):
        with FakeAzure(goal_state_body="<not xml") as az:
            self.assertEqual(get_goal_state(az)[2], "<not xml")

    def test_no_role_instance_for(self):
        with FakeAzure(no_role_instance_for=2) as az:
            for expected in (False, False, True, True):
                root = ElementTree.fromstring(get_goal_state(az)[2])
                self.assertEqual(root.find("Container/RoleInstanceList") is not None, expected)
                self.assertEqual(root.findtext("Container/ContainerId"), az.container_id)


class Health(unittest.TestCase):
    def setUp(self):
        self.az = FakeAzure()
        self.addCleanup(self.az.stop)

    def test_real_agent_reports_are_accepted(self):
        for name, (incarnation, container_id, instance_id) in sorted(SAMPLE_IDS.items()):
            body = sample(name)
            for old, new in ((container_id, self.az.container_id),
                             (instance_id, self.az.instance_id),
                             (">%s<" % incarnation, ">%s<" % self.az.incarnation)):
                self.assertIn(old, body, name)
                body = body.replace(old, new)
            status = fetch(self.az.wireserver_addr, "POST", "/machine?comp=health",
                          HEALTH_HEADERS, body)[0]
            self.assertEqual(status, 200, name)
        states = [(r["state"], r["substatus"]) for r in self.az.health_reports]
        self.assertEqual(sorted(states), [("NotReady", "ProvisioningFailed"),
                                          ("Ready", None), ("Ready", None)])
        failed = [r for r in self.az.health_reports if r["state"] == "NotReady"][0]
        self.assertEqual(failed["description"],
                         "Test error message containing provisioning failure details")
        self.assertTrue(self.az.ready_accepted())

    def test_record_fields(self):
        self.assertEqual(post_health(self.az)[0], 200)
        report = self.az.health_reports[0]
        self.assertEqual(report["incarnation"], 1)
        self.assertEqual(report["container_id"], self.az.container_id)
        self.assertEqual(report["instance_id"], self.az.instance_id)
        self.assertEqual((report["state"], report["status"]), ("Ready", 200))
        self.assertIsNone(report["description"])

    def test_stale_incarnation_is_gone(self):
        self.assertEqual(post_health(self.az, incarnation=0)[0], 410)
        self.assertFalse(self.az.ready_accepted())
        self.assertEqual(self.az.health_reports[0]["status"], 410)

    def test_wrong_ids(self):
        self.assertEqual(post_health(self.az, container_id="other")[0], 400)
        self.assertEqual(post_health(self.az, instance_id="other")[0], 400)
        self.assertFalse(self.az.ready_accepted())

    def test_headers_required(self):
        body = health_xml(1, self.az.container_id, self.az.instance_id)
        addr = self.az.wireserver_addr
        no_version = {"Content-Type": "text/xml"}
        no_type = dict(WIRE_HEADERS)
        self.assertEqual(fetch(addr, "POST", "/machine?comp=health", no_version, body)[0], 400)
        self.assertEqual(fetch(addr, "POST", "/machine?comp=health", no_type, body)[0], 400)
        self.assertEqual(self.az.health_reports, [])
        self.assertEqual(fetch(addr, "POST", "/machine/?comp=health", HEALTH_HEADERS, body)[0],
                         200)

    def test_bad_xml(self):
        bomb = ('<?xml version="1.0"?><!DOCTYPE Health [<!ENTITY a "aaaaaaaa">]>'
                + health_xml(1, "&a;", self.az.instance_id).split("?>", 1)[1])
        for body in ("<Health><unclosed></Health>", "", bomb):
            status = fetch(self.az.wireserver_addr, "POST", "/machine?comp=health",
                          HEALTH_HEADERS, body)[0]
            self.assertEqual(status, 400, body)
        self.assertEqual(self.az.health_reports, [])

    def test_not_ready_only_is_not_accepted_ready(self):
        details = ("<Details><SubStatus>ProvisioningFailed</SubStatus>"
                   "<Description>result=error|reason=x</Description></Details>")
        self.assertEqual(post_health(self.az, state="NotReady", details=details)[0], 200)
        self.assertFalse(self.az.ready_accepted())
        self.assertEqual(self.az.health_reports[0]["description"], "result=error|reason=x")

    def test_unknown_state_and_long_description(self):
        self.assertEqual(post_health(self.az, state="Fine")[0], 400)
        details = "<Details><SubStatus>ProvisioningFailed</SubStatus><Description>%s" \
                  "</Description></Details>" % ("x" * 5000)
        self.assertEqual(post_health(self.az, state="NotReady", details=details)[0], 500)

    def test_bump_incarnation_after(self):
        with FakeAzure(bump_incarnation_after=1) as az:
            root = ElementTree.fromstring(get_goal_state(az)[2])
            self.assertEqual(root.findtext("Incarnation"), "1")
            self.assertEqual(post_health(az, incarnation=1)[0], 410)
            root = ElementTree.fromstring(get_goal_state(az)[2])
            self.assertEqual(root.findtext("Incarnation"), "2")
            self.assertEqual(post_health(az, incarnation=2)[0], 200)
            self.assertEqual(az.incarnation, 2)
            self.assertTrue(az.ready_accepted())


class Imds(unittest.TestCase):
    def test_document(self):
        keys = ["ssh-ed25519 AAAA me@host"]
        with FakeAzure(computer_name="web-7", vm_name="vmss_3", admin_username="alice",
                       public_keys=keys, vm_id="1234") as az:
            status, body = get_imds(az)
            self.assertEqual(status, 200)
            compute = json.loads(body)["compute"]
            self.assertEqual(compute["osProfile"]["computerName"], "web-7")
            self.assertEqual(compute["osProfile"]["adminUsername"], "alice")
            self.assertEqual(compute["name"], "vmss_3")
            self.assertEqual(compute["vmId"], "1234")
            self.assertTrue(compute["resourceId"].endswith("/virtualMachines/vmss_3"))
            self.assertEqual(compute["publicKeys"], [
                {"keyData": keys[0], "path": "/home/alice/.ssh/authorized_keys"}])
            # the rest of Microsoft's sample is there
            self.assertEqual(compute["osProfile"]["disablePasswordAuthentication"], "true")
            self.assertIn("network", json.loads(body))

    def test_defaults(self):
        with FakeAzure() as az:
            compute = json.loads(get_imds(az)[1])["compute"]
            self.assertEqual(compute["name"], "web-7")
            self.assertEqual(compute["osProfile"]["computerName"], "web-7")
            self.assertEqual(compute["osProfile"]["adminUsername"], "azureuser")
            self.assertTrue(compute["publicKeys"][0]["keyData"].startswith("ssh-ed25519 "))
            self.assertEqual(az.instance_id, "%s._web-7" % compute["vmId"])

    def test_no_os_profile(self):
        with FakeAzure(os_profile=False, computer_name="a", vm_name="b") as az:
            compute = json.loads(get_imds(az)[1])["compute"]
            self.assertNotIn("osProfile", compute)
            self.assertEqual(compute["name"], "b")

    def test_text_leaf(self):
        with FakeAzure(vm_name="leaf-1") as az:
            path = "/metadata/instance/compute/name?api-version=2021-02-01&format=text"
            self.assertEqual(get_imds(az, path), (200, "leaf-1"))
            path = "/metadata/instance/compute?api-version=2021-02-01&format=text"
            self.assertEqual(get_imds(az, path)[0], 400)
            path = "/metadata/instance/compute/nothing?api-version=2021-02-01"
            self.assertEqual(get_imds(az, path)[0], 404)

    def test_header_requirements(self):
        with FakeAzure() as az:
            for headers in ({}, {"Metadata": "false"}):
                status, body = get_imds(az, headers=headers)
                self.assertEqual(status, 400)
                self.assertIn("metadata header", json.loads(body)["error"])
            status, body = get_imds(az, headers={"Metadata": "true",
                                                 "X-Forwarded-For": "10.0.0.1"})
            self.assertEqual(status, 403)
            self.assertIn("error", json.loads(body))
            self.assertEqual(get_imds(az, headers={"metadata": "True"})[0], 200)

    def test_api_version_required(self):
        with FakeAzure() as az:
            status, body = get_imds(az, "/metadata/instance")
            self.assertEqual(status, 400)
            self.assertEqual(json.loads(body),
                             json.loads(sample(fake_azure.IMDS_ERROR_SAMPLE)))

    def test_api_version_restriction(self):
        with FakeAzure(imds_api_versions=["2019-06-01"]) as az:
            status, body = get_imds(az)
            self.assertEqual(status, 400)
            error = json.loads(body)
            self.assertIn("api-version", error["error"])
            self.assertEqual(error["newest-versions"], ["2019-06-01"])
            self.assertEqual(get_imds(az, "/metadata/instance?api-version=2019-06-01")[0], 200)


class Faults(unittest.TestCase):
    def test_wire_fault_sequence(self):
        faults = [503, ("status", 429, {"Retry-After": "1"}), "reset", ("delay", 0.3)]
        with FakeAzure(wire_faults=faults) as az:
            status, headers, body = get_goal_state(az)
            self.assertEqual(status, 503)
            self.assertIn("Service Unavailable", body)
            status, headers, _ = get_goal_state(az)
            self.assertEqual((status, headers.get("retry-after")), (429, "1"))
            with self.assertRaises(ConnectionResetError) as caught:
                get_goal_state(az)
            # a real RST, not just an early close (RemoteDisconnected)
            self.assertNotIsInstance(caught.exception, http.client.RemoteDisconnected)
            started = time.monotonic()
            self.assertEqual(get_goal_state(az)[0], 200)
            self.assertGreaterEqual(time.monotonic() - started, 0.25)
            self.assertEqual(get_goal_state(az)[0], 200)    # list used up
            seen = [(r["status"], r["fault"]) for r in az.requests]
            self.assertEqual(seen, [(503, "status 503"), (429, "status 429"), (0, "reset"),
                                    (200, "delay 0.3"), (200, None)])

    def test_wire_faults_apply_to_every_wire_request(self):
        with FakeAzure(wire_faults=[500]) as az:
            self.assertEqual(fetch(az.wireserver_addr, "GET", "/?comp=versions")[0], 500)
            self.assertEqual(fetch(az.wireserver_addr, "GET", "/?comp=versions")[0], 200)
            self.assertEqual(get_imds(az)[0], 200)

    def test_endpoint_faults(self):
        with FakeAzure(goalstate_faults=[503], health_faults=["reset", 500]) as az:
            self.assertEqual(fetch(az.wireserver_addr, "GET", "/?comp=versions")[0], 200)
            self.assertEqual(get_goal_state(az)[0], 503)
            self.assertEqual(get_goal_state(az)[0], 200)
            with self.assertRaises(ConnectionResetError):
                post_health(az)
            self.assertEqual(post_health(az)[0], 500)
            self.assertFalse(az.ready_accepted())
            self.assertEqual(post_health(az)[0], 200)
            self.assertTrue(az.ready_accepted())
            self.assertEqual(len(az.health_reports), 1, "faulted POSTs are not judged")

    def test_imds_faults(self):
        with FakeAzure(imds_faults=[429, "reset", 500]) as az:
            status, body = get_imds(az)
            self.assertEqual(status, 429)
            self.assertIn("error", json.loads(body))
            with self.assertRaises(ConnectionResetError):
                get_imds(az)
            self.assertEqual(get_imds(az)[0], 500)
            self.assertEqual(get_imds(az)[0], 200)
            self.assertEqual(get_goal_state(az)[0], 200)

    def test_wireserver_up_after(self):
        started = time.monotonic()
        with FakeAzure(wireserver_up_after=1.0) as az:
            before = time.time()
            self.assertTrue(refused(az.wireserver_addr))
            self.assertIsNone(az.wireserver_up_at)
            self.assertEqual(get_imds(az)[0], 200, "IMDS is up meanwhile")
            self.assertTrue(az.wait_for(lambda: not refused(az.wireserver_addr), timeout=10))
            self.assertGreaterEqual(time.monotonic() - started, 0.9)
            self.assertEqual(get_goal_state(az)[0], 200)
            self.assertTrue(before < az.wireserver_up_at <= az.requests[-1]["time"])

    def test_imds_down(self):
        with FakeAzure(imds_down=True) as az:
            self.assertTrue(refused(az.imds_addr))
            time.sleep(0.2)
            self.assertTrue(refused(az.imds_addr))
            self.assertEqual(get_goal_state(az)[0], 200)
            # the port stays reserved
            probe = socket.socket()
            try:
                with self.assertRaises(OSError):
                    probe.bind(("127.0.0.1", int(az.imds_addr.rsplit(":", 1)[1])))
            finally:
                probe.close()

    def test_bad_fault_items(self):
        for bad in ("nope", ("delay",), ("status", "x"), None, True):
            with self.assertRaises((ValueError, TypeError)):
                FakeAzure(wire_faults=[bad])

    def test_parse_fault_list(self):
        self.assertEqual(fake_azure.parse_fault_list("503, reset,delay:1.5,429:2"),
                         [503, "reset", ("delay", 1.5), ("status", 429, {"Retry-After": "2"})])
        with self.assertRaises(ValueError):
            fake_azure.parse_fault_list("503,boom")


class Record(unittest.TestCase):
    def test_request_record(self):
        record = tempfile.NamedTemporaryFile(suffix=".jsonl", delete=False)
        record.close()
        self.addCleanup(os.unlink, record.name)
        with FakeAzure(record_file=record.name) as az:
            before = time.time()
            get_imds(az)
            post_health(az)
            requests = az.requests
        self.assertEqual([(r["server"], r["method"], r["path"], r["status"]) for r in requests],
                         [("imds", "GET", IMDS_PATH, 200),
                          ("wireserver", "POST", "/machine?comp=health", 200)])
        self.assertEqual(requests[0]["headers"]["metadata"], "true")
        self.assertEqual(requests[1]["headers"]["x-ms-version"], "2012-11-30")
        self.assertIn("<State>Ready</State>", requests[1]["body"])
        self.assertEqual(requests[0]["body"], "")
        self.assertTrue(before - 1 <= requests[0]["time"] <= requests[1]["time"] <= time.time())
        with open(record.name) as f:
            lines = [json.loads(line) for line in f]
        self.assertEqual([line["type"] for line in lines], ["request", "health", "request"])
        self.assertEqual(lines[1]["state"], "Ready")
        self.assertEqual(lines[2]["path"], "/machine?comp=health")

    def test_concurrent_requests_all_recorded(self):
        with FakeAzure() as az:
            results = []

            def worker():
                for _ in range(5):
                    results.append(get_goal_state(az)[0])

            threads = [threading.Thread(target=worker) for _ in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(30)
            self.assertEqual(results, [200] * 40)
            self.assertEqual(len(az.requests), 40)
            self.assertEqual(az.goal_states_served, 40)

    def test_keep_alive_and_stop(self):
        az = FakeAzure()
        host, port = az.wireserver_addr.split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=5)
        for _ in range(3):      # one connection, several requests
            connection.request("GET", "/machine/?comp=goalstate", headers=WIRE_HEADERS)
            self.assertEqual(connection.getresponse().read()[:5], b"<?xml")
        az.stop()
        az.stop()               # idempotent
        connection.close()
        self.assertTrue(refused(az.wireserver_addr))

    def test_on_request_sees_a_request_while_it_is_pending(self):
        # the boot test's power cuts act at that moment (a held IMDS answer, a Ready POST)
        seen = []
        with FakeAzure(imds_faults=[("delay", 1.0)],
                       on_request=lambda kind, method, path, headers: seen.append(
                           (kind, method, path, headers.get("metadata"), time.monotonic(),
                            len(az.requests)))) as az:
            started = time.monotonic()
            self.assertEqual(get_imds(az)[0], 200)
            post_health(az)
        self.assertEqual([s[:4] for s in seen], [("imds", "GET", IMDS_PATH, "true"),
                                                 ("wireserver", "POST", "/machine?comp=health",
                                                  None)])
        self.assertLess(seen[0][4] - started, 0.9, "called before the held answer")
        self.assertEqual([s[5] for s in seen], [0, 1], "called before the request is recorded")

    def test_wait_for_is_bounded(self):
        with FakeAzure() as az:
            started = time.monotonic()
            self.assertFalse(az.wait_for(az.ready_accepted, timeout=0.2))
            self.assertLess(time.monotonic() - started, 2)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

# A minimal agent used as the command under `run` and as the provisioner under
# `demo`.  It only touches /etc and the hostname after proving it is inside the
# demo's private namespace (private /etc marker + template hostname).
STAND_IN = r'''
import http.client, json, os, socket, sys
from xml.etree import ElementTree
args = sys.argv[1:]

def addr(flag):
    host, port = args[args.index(flag) + 1].split(":")
    return host, int(port)

imds = http.client.HTTPConnection(*addr("--imds"), timeout=5)
imds.request("GET", "/metadata/instance?api-version=2021-02-01", headers={"Metadata": "true"})
name = json.loads(imds.getresponse().read().decode())["compute"]["osProfile"]["computerName"]
if "--no-hostname" not in args:
    if not (os.path.exists("/etc/.fake-azure-demo") and socket.gethostname() == "image-template"):
        sys.exit(99)
    socket.sethostname(name)
    # the mount /var/lib is here (the last one listed there is the one seen)
    with open("/proc/self/mountinfo") as f:
        sources = [line.split(" - ")[1].split()[1] for line in f
                   if line.split()[4] == "/var/lib"]
    sys.stderr.write("stand-in: /var/lib from %s\n" % (sources or ["/"])[-1])
    with open("/etc/hostname.tmp", "w") as f:
        f.write(name + "\n")
    os.rename("/etc/hostname.tmp", "/etc/hostname")
    with open("/etc/hosts") as f:
        hosts = f.read().replace("image-template", name)
    with open("/etc/hosts", "w") as f:
        f.write(hosts)
wire = http.client.HTTPConnection(*addr("--wireserver"), timeout=5)
headers = {"x-ms-version": "2012-11-30", "x-ms-agent-name": "stand-in"}
wire.request("GET", "/machine/?comp=goalstate", headers=headers)
gs = ElementTree.fromstring(wire.getresponse().read())
ids = (gs.findtext("Incarnation").strip(), gs.findtext("Container/ContainerId").strip(),
       gs.findtext("Container/RoleInstanceList/RoleInstance/InstanceId").strip())
body = ("<Health><GoalStateIncarnation>%s</GoalStateIncarnation><Container><ContainerId>%s"
        "</ContainerId><RoleInstanceList><Role><InstanceId>%s</InstanceId><Health><State>"
        "Ready</State></Health></Role></RoleInstanceList></Container></Health>" % ids)
headers["Content-Type"] = "text/xml;charset=utf-8"
wire.request("POST", "/machine?comp=health", body=body, headers=headers)
status = wire.getresponse().status
sys.stderr.write("stand-in: args %s computerName %s health %d\n" % (args, name, status))
sys.exit(0 if status == 200 else 1)
'''


def run_cli(*args, **kwargs):
    process = subprocess.Popen(shielded([sys.executable, SCRIPT] + list(args)), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, universal_newlines=True, **kwargs)
    try:
        out, err = process.communicate(timeout=CHILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        raise AssertionError("fake_azure.py %s hung\n%s\n%s" % (args, out, err))
    return process.returncode, out, err


class CommandLine(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="fake-azure-test-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.stand_in = os.path.join(self.tmp, "stand_in.py")
        with open(self.stand_in, "w") as f:
            f.write(STAND_IN)

    def test_help(self):
        for args in ([], ["serve"], ["run"], ["demo"]):
            code, out, err = run_cli(*(args + ["--help"]))
            self.assertEqual((code, err), (0, ""), args)
            self.assertIn("usage: fake_azure.py", out)
        self.assertIn("--wire-faults FAULTS", run_cli("serve", "--help")[1])
        self.assertEqual(run_cli()[0], 2)

    def test_options_map_to_constructor(self):
        goal_state = os.path.join(self.tmp, "gs.xml")
        with open(goal_state, "w") as f:
            f.write("<GoalState/>")
        args = fake_azure.build_parser().parse_args([
            "serve", "--computer-name", "n1", "--vm-name", "vmss_1", "--no-os-profile",
            "--incarnation", "4", "--imds-api-versions", "2019-06-01,2021-02-01",
            "--wire-faults", "503,503,reset", "--health-faults", "429:2",
            "--wireserver-up-after", "3", "--goal-state-file", goal_state,
            "--no-role-instance-for", "1", "--bump-incarnation-after", "2", "--imds-down",
            "--public-key", "ssh-rsa AAAA x"])
        kwargs = fake_azure.emulator_kwargs(args)
        expected = dict(computer_name="n1", vm_name="vmss_1", os_profile=False, incarnation=4,
                        imds_api_versions=["2019-06-01", "2021-02-01"],
                        wire_faults=[503, 503, "reset"],
                        health_faults=[("status", 429, {"Retry-After": "2"})],
                        wireserver_up_after=3.0, goal_state_body="<GoalState/>",
                        no_role_instance_for=1, bump_incarnation_after=2, imds_down=True,
                        public_keys=["ssh-rsa AAAA x"], host="127.0.0.1")
        for key, value in expected.items():
            self.assertEqual(kwargs[key], value, key)
        with FakeAzure(**kwargs) as az:     # every option is a valid constructor keyword
            self.assertTrue(refused(az.imds_addr))

    def test_serve_prints_address_and_stops_on_sigterm(self):
        record = os.path.join(self.tmp, "record.jsonl")
        process = subprocess.Popen(
            [sys.executable, SCRIPT, "serve", "--computer-name", "cli-1", "--incarnation", "3",
             "--record", record], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            universal_newlines=True)
        try:
            ready = select.select([process.stdout], [], [], CHILD_TIMEOUT)[0]
            self.assertTrue(ready, "serve printed nothing")
            line = process.stdout.readline()
            match = re.match(r"^wireserver (127\.0\.0\.1:\d+) imds (127\.0\.0\.1:\d+)\n$", line)
            self.assertTrue(match, repr(line))
            wire, imds = match.groups()
            status, _, body = fetch(imds, "GET", "/metadata/instance/compute/name?api-version="
                                   "2021-02-01&format=text", {"Metadata": "true"})
            self.assertEqual((status, body), (200, "cli-1"))
            status, _, body = fetch(wire, "GET", "/machine?comp=goalstate", WIRE_HEADERS)
            self.assertIn("<Incarnation>3</Incarnation>", body)
            process.send_signal(signal.SIGTERM)
            out, err = process.communicate(timeout=CHILD_TIMEOUT)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
        self.assertEqual(process.returncode, 0, err)
        self.assertIn("2 request(s)", err)
        with open(record) as f:
            self.assertEqual(len(f.readlines()), 2)

    def test_run_propagates_exit_code(self):
        code, out, err = run_cli("run", "--", sys.executable, "-c",
                                 "import sys; print(sys.argv[1:]); sys.exit(3)",
                                 "{wireserver}", "{imds}")
        self.assertEqual(code, 3, err)
        self.assertRegex(out, r"\['127\.0\.0\.1:\d+', '127\.0\.0\.1:\d+'\]")
        self.assertIn("command exited with 3", err)
        self.assertIn("Ready accepted: no", err)

    def test_run_with_agent_and_faults(self):
        code, out, err = run_cli("run", "--computer-name", "run-7", "--goalstate-faults",
                                 "503", "--", sys.executable, self.stand_in, "--wireserver",
                                 "{wireserver}", "--imds", "{imds}", "--no-hostname")
        # the stand-in does not retry: the 503 makes it fail to parse and exit 1
        self.assertEqual(code, 1, err)
        code, out, err = run_cli("run", "--computer-name", "run-7", "--", sys.executable,
                                 self.stand_in, "--wireserver", "{wireserver}", "--imds",
                                 "{imds}", "--no-hostname")
        self.assertEqual(code, 0, err)
        self.assertIn("computerName run-7 health 200", err)
        self.assertIn("Ready incarnation 1 -> 200", err)
        self.assertIn("Ready accepted: yes", err)

    def test_run_timeout_and_missing_command(self):
        code, _, err = run_cli("run", "--timeout", "0.5", "--", sys.executable, "-c",
                               "import time; time.sleep(30)")
        self.assertEqual(code, 124, err)
        self.assertEqual(run_cli("run", "--", "/nonexistent/command")[0], 127)
        self.assertEqual(run_cli("run")[0], 2)

    def test_demo(self):
        real_hostname = socket.gethostname()
        real_etc = {}
        for name in ("hostname", "hosts"):
            if os.path.exists("/etc/" + name):
                with open("/etc/" + name, "rb") as f:
                    real_etc[name] = f.read()
        code, out, err = run_cli("demo", "--script", self.stand_in, "--timeout", "30")
        self.assertEqual(code, 0, out + err)
        self.assertIn("computerName demo-vm-1 health 200", err)
        self.assertIn("Ready accepted: yes", out)
        problem = fake_azure.namespace_problem()
        if problem is None:
            self.assertIn("namespace hostname before: image-template", out)
            self.assertIn("namespace hostname after:  demo-vm-1", out)
            self.assertRegex(out, r"/etc/hostname after:\n    demo-vm-1\n")
            self.assertRegex(out, r"/etc/hosts after:\n(    .*\n)*    127.0.1.1\tdemo-vm-1\n")
            # the provisioner's record and KVP pool go to a /var/lib of the demo's own
            self.assertIn("stand-in: /var/lib from fake-azure-demo-var-lib\n", err)
        else:
            sys.stderr.write("\nNOTE %s: no namespace here (%s); checked the --no-hostname "
                             "fallback only\n" % (self.id(), problem))
            self.assertIn("running with --no-hostname", out)
            self.assertIn("'--no-hostname'", err)
        # the machine itself is untouched
        self.assertEqual(socket.gethostname(), real_hostname)
        for name, content in real_etc.items():
            with open("/etc/" + name, "rb") as f:
                self.assertEqual(f.read(), content, name)

    def test_demo_fallback_without_namespace(self):
        code, out, err = run_cli("demo", "--script", self.stand_in, "--no-namespace")
        self.assertEqual(code, 0, out + err)
        self.assertIn("cannot make a private namespace (--no-namespace given); running "
                      "with --no-hostname", out)
        self.assertIn("'-v', '--no-hostname'] computerName demo-vm-1 health 200", err)
        self.assertNotIn("namespace hostname", out)
        self.assertIn("Ready accepted: yes", out)

    def test_demo_without_script(self):
        code, out, _ = run_cli("demo", "--script", os.path.join(self.tmp, "missing.py"))
        self.assertEqual(code, 2)
        self.assertIn("not found", out)


if __name__ == "__main__":
    unittest.main()
