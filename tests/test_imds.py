"""IMDS section: the instance document request, fallback, retries, bad documents."""

import json
import os
import unittest

import azure_provisioning as ap
from tests.fake_azure import FakeAzure
from tests.support import DATA
from tests.test_transport import QuietLog, RawServer

VM_ID = '02aab8a4-74ef-476e-8182-f6d2ba4166a6'      # azure-docs' sample instance document


def fetch(az, seconds=10):
    return ap.fetch_instance_metadata(ap.parse_address(az.imds_addr), ap.Deadline(seconds),
                                      QuietLog())


class InstanceDocument(unittest.TestCase):
    def test_request_shape_and_fields(self):
        with FakeAzure(computer_name='web-9', vm_id='11111111-2222-3333-4444-555555555555') as az:
            document = fetch(az)
            request, = az.requests
        self.assertEqual(request['path'], '/metadata/instance?api-version=2021-02-01')
        self.assertEqual(request['headers']['metadata'], 'true')
        self.assertEqual(ap.desired_hostname(document), 'web-9')
        self.assertEqual(ap.compute_field(document, 'vmId'),
                         '11111111-2222-3333-4444-555555555555')

    def test_fallback_only_once(self):
        with FakeAzure(imds_api_versions=['2017-01-01']) as az:
            with self.assertRaisesRegex(ap.ProvisioningError, r'IMDS answered HTTP 400'):
                fetch(az)
            self.assertEqual(len(az.requests), 2)

    def test_warming_up_statuses_are_retried_but_403_is_not(self):
        with FakeAzure(imds_faults=[404, 410, 503, 429]) as az:
            fetch(az)
            self.assertEqual([r['status'] for r in az.requests], [404, 410, 503, 429, 200])
        with FakeAzure(imds_faults=[403]) as az:
            with self.assertRaisesRegex(ap.ProvisioningError, 'HTTP 403'):
                fetch(az)
            self.assertEqual(len(az.requests), 1)


class ParseJson(unittest.TestCase):
    """parse_json (json's C scanner, without importing json) agrees with json.loads."""

    def test_same_values_as_json_loads(self):
        with open(os.path.join(DATA, 'azure-docs__imds-full-instance-response-linux.json')) as f:
            sample = f.read()
        for text in [sample, ' {"a": [1, -2.5e3, true, false, null]}\n', '"\\u00e9\\ud83d\\ude00"',
                     '[]', '0', '{"nested": {"x": [{"y": ""}]}}', '{"n": 12345678901234567890}',
                     '\t\r\n[1]\t\r\n', '{"dup": 1, "dup": 2}']:
            with self.subTest(text=text[:40]):
                self.assertEqual(ap.parse_json(text), json.loads(text))

    def test_constants_like_json_loads(self):
        self.assertEqual(ap.parse_json('[Infinity, -Infinity]'), [float('inf'), float('-inf')])
        self.assertNotEqual(ap.parse_json('NaN'), ap.parse_json('NaN'))

    def test_what_json_loads_refuses_is_a_value_error(self):
        for text in ['', '   ', '{', '{"a": }', '[1,]', '{"a": 1} x', '[1] [2]', "{'a': 1}",
                     '"unterminated', '"bad \\x escape"', '\ufeff{}', '"ctrl \x01 char"']:
            with self.subTest(text=text):
                with self.assertRaises(ValueError):
                    json.loads(text)
                with self.assertRaises(ValueError):
                    ap.parse_json(text)


class BadDocuments(unittest.TestCase):
    def serve(self, body):
        reply = (b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n'
                 b'Content-Length: %d\r\n\r\n' % len(body)) + body
        server = RawServer(reply)
        self.addCleanup(server.close)
        return server

    def test_invalid_json_is_retried_then_fails(self):
        for body in [b'{"compute": ', b'[]', b'{"compute": "x"}', b'\xff\xfe']:
            with self.subTest(body=body):
                server = self.serve(body)
                with self.assertRaisesRegex(ap.ProvisioningError, 'instance document is not valid'):
                    ap.fetch_instance_metadata(server.address, ap.Deadline(10), QuietLog())
                self.assertEqual(server.connections, ap.MALFORMED_ANSWERS_ALLOWED)

    def test_published_sample_is_accepted(self):
        with open(os.path.join(DATA, 'azure-docs__imds-full-instance-response-linux.json'),
                  'rb') as f:
            raw = f.read()
        server = self.serve(raw)
        document = ap.fetch_instance_metadata(server.address, ap.Deadline(10), QuietLog())
        self.assertEqual(ap.desired_hostname(document), 'examplevmname')
        # the whole document, value for value, not only the fields the steps read
        self.assertEqual(document, json.loads(raw.decode('utf-8')))
        self.assertEqual(ap.compute_field(document, 'vmId'), VM_ID)
        self.assertEqual(ap.compute_field(document, 'osProfile', 'adminUsername'), 'admin')


if __name__ == '__main__':
    unittest.main()
