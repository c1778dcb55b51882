"""Start-up budget (#4): a whole provisioning run, hostname included when root, loads
none of the modules the script avoids on the path to Ready.  Each of them costs a
measurable share of boot time on every VM (tests/bench.py shows how much)."""

import sys
import unittest

from tests.fake_azure import FakeAzure
from tests.support import SCRIPT, PrivateHost, is_root, run_command

# socket.py (enum, selectors), json and re (the regex engine), and what http.client,
# argparse and subprocess would bring; none is needed to say Ready.
AVOIDED = ('socket', 'enum', 'selectors', 're', 'json', 'json.decoder', 'http.client',
           'email', 'ssl', 'argparse', 'subprocess', 'xml.etree.ElementTree', 'random')

# Runs the script as the unit does (-I -S) and prints the modules loaded, on exit.
# `--compile-only SCRIPT` stops before running it: the baseline of what the
# interpreter and this loader load by themselves.
LOADER = ('import atexit, sys\n'
          'atexit.register(lambda: sys.stdout.write("@@modules=%s\\n" % " ".join(sys.modules)))\n'
          'run = sys.argv[1] != "--compile-only"\n'
          'sys.argv = sys.argv[1 if run else 2:]\n'
          'with open(sys.argv[0], "rb") as f:\n'
          '    code = compile(f.read(), sys.argv[0], "exec")\n'
          'if run:\n'
          '    exec(code, {"__name__": "__main__", "__file__": sys.argv[0]})\n')


def loaded_modules(stdout):
    for line in stdout.splitlines():
        if line.startswith('@@modules='):
            return set(line[len('@@modules='):].split())
    raise AssertionError('no module list in:\n' + stdout)


class PathToReady(unittest.TestCase):
    def run_to_ready(self, az):
        command = [sys.executable, '-I', '-S', '-c', LOADER, SCRIPT,
                   '--wireserver', az.wireserver_addr, '--imds', az.imds_addr]
        if not is_root():
            return run_command(command + ['--no-hostname']), None
        host = PrivateHost('image-template')
        self.addCleanup(host.cleanup)
        return host.run(command), host

    def test_no_avoided_module_is_loaded(self):
        baseline = loaded_modules(run_command(
            [sys.executable, '-I', '-S', '-c', LOADER, '--compile-only', SCRIPT]).stdout)
        with FakeAzure(computer_name='web-7') as az:
            run, host = self.run_to_ready(az)
            self.assertEqual(run.code, 0, run.stderr)
            self.assertTrue(az.ready_accepted(), run.stderr)
        if host is not None:
            self.assertEqual(run.hostname_after, 'web-7')
            self.assertIn('127.0.1.1\tweb-7\n', host.read('hosts'))
        loaded = loaded_modules(run.stdout) - baseline
        self.assertIn('pyexpat', loaded)    # the check sees the goal state being parsed
        self.assertEqual(sorted(loaded & set(AVOIDED)), [])

    def test_a_python_without_the_json_accelerator_still_parses(self):
        # parse_json falls back to json.loads when _json is missing (PyPy, odd builds)
        import azure_provisioning as ap
        real = sys.modules.get('_json')
        sys.modules['_json'] = None
        try:
            self.assertEqual(ap.parse_json(' {"a": [1, 2.5, "\\u00e9"]} '),
                             {'a': [1, 2.5, '\u00e9']})
            with self.assertRaises(ValueError):
                ap.parse_json('{"a": }')
        finally:
            if real is None:
                del sys.modules['_json']
            else:
                sys.modules['_json'] = real


if __name__ == '__main__':
    unittest.main()
