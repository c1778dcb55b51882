"""CLI section: the fast parser and argparse both give the values written out here
(literals: both parsers read one table, so comparing them with each other cannot
see a changed default), everything else goes to argparse (exit 2 with its message),
and main() hands each flag on to the run."""

import contextlib
import io
import unittest
from unittest import mock

import azure_provisioning as ap

# What the unit's plain ExecStart (no options at all) must get: Azure's fixed
# addresses and a 20-minute deadline, like waagent's and cloud-init's.
DEFAULTS = {'wireserver': ('168.63.129.16', 80), 'imds': ('169.254.169.254', 80),
            'timeout': 1200, 'no_hostname': False, 'no_publish_hostname': False,
            'provision_user': False, 'check': False, 'root': '/', 'dry_run': False,
            'verbose': False, 'media': None, 'keep_host_keys': False, 'deprovision': False,
            'remove_user': False, 'status': False, 'json': False, 'shown_root': None}

VALID = [
    ([], {}),
    (['--media', '/dev/sr1'], {'media': '/dev/sr1'}),
    (['--media=none'], {'media': 'none'}),
    (['--wireserver', '127.0.0.1:8080', '--imds=127.0.0.1:8081'],
     {'wireserver': ('127.0.0.1', 8080), 'imds': ('127.0.0.1', 8081)}),
    (['-v', '--timeout', '30', '--no-hostname', '--dry-run'],
     {'verbose': True, 'timeout': 30.0, 'no_hostname': True, 'dry_run': True}),
    (['--timeout=0.5', '--provision-user', '--no-publish-hostname', '--verbose'],
     {'timeout': 0.5, 'provision_user': True, 'no_publish_hostname': True, 'verbose': True}),
    (['--check', '--root', '/mnt/image'], {'check': True, 'root': '/mnt/image'}),
    (['--wireserver', '[::1]:80', '--wireserver', '10.0.0.1'],     # the last one wins
     {'wireserver': ('10.0.0.1', 80)}),
    (['--imds', '[::1]:8081'], {'imds': ('::1', 8081)}),
]


class Defaults(unittest.TestCase):
    def test_constants(self):
        self.assertEqual(ap.DEFAULT_TIMEOUT, 1200)
        self.assertEqual(ap.DEFAULT_WIRESERVER, '168.63.129.16')
        self.assertEqual(ap.DEFAULT_IMDS, '169.254.169.254')

    def test_no_arguments_gives_azures_addresses_and_20_minutes(self):
        for parse in (ap.parse_args, ap.build_parser().parse_args):
            with self.subTest(parser=parse.__name__):
                options = parse([])
                self.assertEqual(options.timeout, 1200)
                self.assertEqual(options.wireserver, ('168.63.129.16', 80))
                self.assertEqual(options.imds, ('169.254.169.254', 80))

    def test_run_options_default_to_the_same(self):
        options = ap.Options()
        self.assertEqual((options.wireserver, options.imds, options.timeout),
                         (('168.63.129.16', 80), ('169.254.169.254', 80), 1200))
        self.assertEqual((options.set_hostname, options.publish_hostname,
                          options.provision_user, options.dry_run), (True, True, False, False))

    def test_help_says_the_defaults(self):
        text = ap.build_parser().format_help()
        for literal in ('default 168.63.129.16', 'default 169.254.169.254', 'default 1200'):
            self.assertIn(literal, ' '.join(text.split()))


class FastParser(unittest.TestCase):
    def test_both_parsers_give_the_written_out_values(self):
        for args, changes in VALID:
            expected = dict(DEFAULTS, **changes)
            with self.subTest(args=args):
                self.assertEqual(vars(ap.parse_args(args)), expected)
                self.assertEqual(vars(ap.build_parser().parse_args(args)), expected)

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


class MainHandsOn(unittest.TestCase):
    """main() -> Options: each switch reaches the run (provision() is replaced by a
    recorder, so nothing runs)."""

    def options_for(self, *args):
        seen = []
        with mock.patch.object(ap, 'provision',
                               side_effect=lambda options, *rest: seen.append(options) or 0):
            self.assertEqual(ap.main(list(args)), 0)
        (options,) = seen
        return options

    def test_defaults(self):
        options = self.options_for()
        self.assertEqual((options.wireserver, options.imds, options.timeout),
                         (('168.63.129.16', 80), ('169.254.169.254', 80), 1200))
        self.assertEqual((options.set_hostname, options.publish_hostname, options.provision_user,
                          options.dry_run), (True, True, False, False))

    def test_each_switch(self):
        for args, attribute, value in [
                (['--no-hostname'], 'set_hostname', False),
                (['--no-publish-hostname'], 'publish_hostname', False),
                (['--provision-user'], 'provision_user', True),
                (['--dry-run'], 'dry_run', True),
                (['--timeout', '45'], 'timeout', 45.0),
                (['--wireserver', '127.0.0.1:9'], 'wireserver', ('127.0.0.1', 9)),
                (['--imds', '127.0.0.1:10'], 'imds', ('127.0.0.1', 10))]:
            with self.subTest(args=args):
                options = self.options_for(*args)
                self.assertEqual(getattr(options, attribute), value)
                # and nothing else moved
                self.assertEqual(options.publish_hostname, attribute != 'publish_hostname')
                self.assertEqual(options.set_hostname, attribute != 'set_hostname')


if __name__ == '__main__':
    unittest.main()
