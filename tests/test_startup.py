"""Start-up budget: a whole provisioning run, hostname included when root, loads
nothing heavy it does not use (http.client's email and ssl cost ~20 ms at every
boot of every VM; tests/bench.py measures) and nothing from site-packages (the unit
runs `python3 -I -S`: no third-party code at boot)."""

import ast
import sys
import unittest

from tests.fake_azure import FakeAzure
from tests.support import SCRIPT, PrivateHost, is_root, run_command

AVOIDED = ('http.client', 'email', 'ssl', 'argparse', 'xml.etree.ElementTree', 'random',
           'urllib.request', 'site')

# Runs the script as the unit does (-I -S) and prints the modules loaded (with the
# file each came from), on exit.
# `--compile-only SCRIPT` stops before running it: the baseline of what the
# interpreter and this loader load by themselves.
LOADER = ('import atexit, sys\n'
          'atexit.register(lambda: sys.stdout.write("@@modules=%s\\n" % " ".join(\n'
          '    "%s=%s" % (n, getattr(m, "__file__", None)) for n, m in list(sys.modules.items()))))\n'
          'run = sys.argv[1] != "--compile-only"\n'
          'sys.argv = sys.argv[1 if run else 2:]\n'
          'with open(sys.argv[0], "rb") as f:\n'
          '    code = compile(f.read(), sys.argv[0], "exec")\n'
          'if run:\n'
          '    exec(code, {"__name__": "__main__", "__file__": sys.argv[0]})\n')


def loaded_modules(stdout):
    for line in stdout.splitlines():
        if line.startswith('@@modules='):
            return dict(item.split('=', 1) for item in line[len('@@modules='):].split())
    raise AssertionError('no module list in:\n' + stdout)


def imports(path):
    """({module imported at the top}, {function: [modules it imports]}) of a file."""
    with open(path, encoding='utf-8') as f:
        tree = ast.parse(f.read())
    top, lazy = set(), {}

    def names(node):
        if isinstance(node, ast.Import):
            return [alias.name for alias in node.names]
        if isinstance(node, ast.ImportFrom):
            return [node.module]
        return []

    def visit(node, function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, child.name)
                continue
            for name in names(child):
                if function is None:
                    top.add(name)
                else:
                    lazy.setdefault(function, []).append(name)
            visit(child, function)
    visit(tree, None)
    return top, lazy


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
        modules = loaded_modules(run.stdout)
        loaded = set(modules) - set(baseline)
        self.assertIn('pyexpat', loaded)    # the check sees the goal state being parsed
        self.assertEqual(sorted(loaded & set(AVOIDED)), [])
        # the rule of the module's docstring: what the path to Ready loads in any case
        # is imported at the top, once; a function imports only what it alone needs
        top, lazy = imports(SCRIPT)
        self.assertEqual(sorted((function, name) for function, names in lazy.items()
                                for name in names if name in modules or name in top), [])
        self.assertEqual(sorted(function for function, names in lazy.items()
                                if len(names) != len(set(names))), [])
        self.assertLessEqual(top, set(modules))
        self.assertEqual([(name, path) for name, path in modules.items()
                          if 'site-packages' in path or 'dist-packages' in path], [])


if __name__ == '__main__':
    unittest.main()
