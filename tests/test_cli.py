"""CLI section: the fast parser agrees with argparse on every valid command line,
and hands everything else to argparse (exit 2 with its message)."""

import contextlib
import io
import unittest

import azure_provisioning as ap

VALID = [
    [],
    ['--wireserver', '127.0.0.1:8080', '--imds=127.0.0.1:8081'],
    ['-v', '--timeout', '30', '--no-hostname', '--dry-run'],
    ['--timeout=0.5', '--provision-user', '--no-publish-hostname', '--verbose'],
    ['--check', '--root', '/mnt/image'],
    ['--wireserver', '[::1]:80', '--wireserver', '10.0.0.1'],      # the last one wins
]


class FastParser(unittest.TestCase):
    def test_same_result_as_argparse(self):
        for args in VALID:
            with self.subTest(args=args):
                self.assertEqual(vars(ap.parse_args(args)),
                                 vars(ap.build_parser().parse_args(args)))

    def test_everything_else_is_argparse_exit_2(self):
        for args in (['--bogus'], ['--timeout'], ['--timeout', 'nan'], ['--no-hostname=yes'],
                     ['--wireserver', 'a:b:c'], ['-x'], ['positional']):
            with self.subTest(args=args):
                stderr = io.StringIO()
                with contextlib.redirect_stderr(stderr):
                    with self.assertRaises(SystemExit) as caught:
                        ap.parse_args(args)
                self.assertEqual(caught.exception.code, 2)
                self.assertIn('azure-provisioning: error: ', stderr.getvalue())


if __name__ == '__main__':
    unittest.main()
