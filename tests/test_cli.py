"""CLI section: the fast parser and argparse both give the values written out here
(literals: both parsers read one table, so comparing them with each other cannot
see a changed default) in one record (Options), everything else goes to argparse
(exit 2 with its message), each mode takes the options its row of the table says
and refuses the others, and main() hands each flag on to the run."""

import contextlib
import io
import unittest
from unittest import mock

import azure_provisioning as ap

# What the unit's plain ExecStart (no options at all) must get: Azure's fixed
# addresses and a 20-minute deadline, like waagent's and cloud-init's.
DEFAULTS = {'wireserver': ('168.63.129.16', 80), 'imds': ('169.254.169.254', 80),
            'timeout': 1200, 'set_hostname': True, 'publish_hostname': True,
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
     {'verbose': True, 'timeout': 30.0, 'set_hostname': False, 'dry_run': True}),
    (['--timeout=0.5', '--provision-user', '--no-publish-hostname', '--verbose'],
     {'timeout': 0.5, 'provision_user': True, 'publish_hostname': False, 'verbose': True}),
    (['--check', '--root', '/mnt/image'], {'check': True, 'root': '/mnt/image'}),
    (['--wireserver', '[::1]:80', '--wireserver', '10.0.0.1'],     # the last one wins
     {'wireserver': ('10.0.0.1', 80)}),
    (['--imds', '[::1]:8081'], {'imds': ('::1', 8081)}),
    # abbreviations: the fast parser leaves them to argparse, which fills the same record
    (['--no-host', '--verb', '--keep-ssh'],
     {'set_hostname': False, 'verbose': True, 'keep_host_keys': True}),
    (['--deprovision', '--dry-run', '--us'], {'deprovision': True, 'dry_run': True,
                                             'remove_user': True}),
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
                options = ap.parse_args(args)
                self.assertIsInstance(options, ap.Options)
                self.assertEqual(vars(options), expected)
                self.assertEqual(vars(ap.build_parser().parse_args(args, ap.Options())), expected)

    def test_options_is_the_record_with_the_same_defaults(self):
        self.assertEqual(vars(ap.Options()), DEFAULTS)
        self.assertEqual(vars(ap.Options(root='/mnt', dry_run=True)),
                         dict(DEFAULTS, root='/mnt', dry_run=True))
        with self.assertRaisesRegex(TypeError, 'no field no_hostname'):
            ap.Options(no_hostname=True)

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


def handed_on(*args):
    """The Options main() hands to provision() for args (nothing runs)."""
    seen = []
    with mock.patch.object(ap, 'provision',
                           side_effect=lambda options, *rest: seen.append(options) or 0):
        code = ap.main(list(args))
    assert code == 0 and len(seen) == 1, (code, seen)
    return seen[0]


def usage(args):
    """(exit status, stderr) of parsing and checking args as main() does."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            ap.check_usage(ap.parse_args(args))
        except SystemExit as exc:
            return exc.code, stderr.getvalue()
    return 0, stderr.getvalue()


def refused(message):
    return 2, 'azure-provisioning: error: %s (see --help)\n' % message


# A value for each option that takes one: not its default, and valid
SAMPLES = {'wireserver': '127.0.0.1:9', 'imds': '127.0.0.1:9', 'timeout': '5', 'root': '/tmp',
           'shown_root': '/mnt/image', 'media': 'none'}


class Modes(unittest.TestCase):
    def test_the_mistakes_and_their_words(self):
        for args, outcome in [
                (['--check', '--status'], refused('--check and --status do not go together')),
                (['--status', '--deprovision'],
                 refused('--deprovision and --status do not go together')),
                (['--check', '--timeout', '30'], refused('--timeout does not go with --check')),
                (['--status', '--no-hostname'], refused('--no-hostname does not go with --status')),
                (['--deprovision', '-v'], refused('--verbose does not go with --deprovision')),
                (['--check', '--dry-run'], refused('--dry-run does not go with --check')),
                (['--root', '/tmp'], refused('--root goes with --check, --deprovision or --status')),
                (['--user'], refused('--user goes with --deprovision')),
                (['--status', '--user'], refused('--user goes with --deprovision')),
                (['--json', '--check'], refused('--json goes with --status')),
                (['--shown-root', '/x'], refused('--shown-root goes with --check')),
                (['--status', '--root', '/nonexistent-azp'],
                 refused('--root /nonexistent-azp: not a directory')),
                (['--check', '--timeout', '1200'], (0, '')),     # the default: not given
                (['--deprovision', '--dry-run', '--user', '--root', '/tmp'], (0, '')),
                (['--status', '--json', '--root', '/tmp'], (0, '')),
                (['--check', '--shown-root', '/x', '--root', '/tmp'], (0, ''))]:
            with self.subTest(args=args):
                self.assertEqual(usage(args), outcome)

    def check_every_row(self):
        modes = [ap.RUN] + [option.flag for option in ap.OPTIONS
                            if option.modes == (option.flag,)]
        self.assertEqual(modes[1:], [ap.CHECK, ap.DEPROVISION, ap.STATUS])
        for option in ap.OPTIONS:
            given = [option.flag] if option.metavar is None else [
                '%s=%s' % (option.flag, SAMPLES[option.dest])]
            for mode in modes:
                args = given if mode in (ap.RUN, option.flag) else [mode] + given
                if mode in option.modes or option.modes == (option.flag,) and mode == ap.RUN:
                    expected = (0, '')      # taken, or a mode switch choosing its mode
                elif option.modes == (option.flag,):
                    expected = refused('%s and %s do not go together' % tuple(
                        flag for flag in modes if flag in (mode, option.flag)))
                elif ap.RUN in option.modes:
                    expected = refused('%s does not go with %s' % (option.flag, mode))
                else:
                    expected = refused('%s goes with %s' % (option.flag, ap.or_list(option.modes)))
                with self.subTest(args=args):
                    self.assertEqual(usage(args), expected)

    def test_each_row_is_taken_by_its_modes_and_refused_by_the_others(self):
        self.check_every_row()

    def test_a_new_provisioning_option_needs_no_other_edit(self):
        # a row added to the table alone: a field of the record, parsed by both
        # parsers, refused by every mode, handed to the run
        sing = ap.Option('--sing', 'sing', None, None, False, (ap.RUN,), 'sing')
        with mock.patch.object(ap, 'OPTIONS', ap.OPTIONS + [sing]):
            self.check_every_row()
            self.assertEqual(usage(['--check', '--sing']),
                             refused('--sing does not go with --check'))
            self.assertEqual(usage(['--status', '--si']),    # argparse's abbreviation
                             refused('--sing does not go with --status'))
            self.assertIs(ap.Options().sing, False)
            self.assertIs(handed_on('--sing').sing, True)


class MainHandsOn(unittest.TestCase):
    """main() -> Options: each switch reaches the run (provision() is replaced by a
    recorder, so nothing runs)."""

    def options_for(self, *args):
        return handed_on(*args)

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
