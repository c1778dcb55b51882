"""The Packer template packer/azure-provisioning.pkr.hcl, which README.md links
(section "Building the image with Packer"), is validated, so that it cannot rot.

How it is validated, and why:

- `packer validate` in full, not `-syntax-only`: full validation runs each
  component's own configuration check (the azure-arm builder's options and
  values, the shell and file provisioners' arguments, a misspelled argument with
  "Did you mean ...?") and checks that the file provisioner's sources exist. The
  template's `repo` variable is set to this repository, so the files it uploads
  are the real ones: renaming one fails here.
- Debian's packer (1.6.6, installed by .ci/run) builds the azure-arm builder in,
  so full validation works offline, but it predates `required_plugins` (Packer
  1.7), which the template needs for today's Packer (1.10+ bundles no plugins).
  With a Packer older than 1.7 the test removes that one block (asserting it
  was there exactly once and that nothing else changed) and validates the rest
  in full. With 1.7 or newer it validates the template as written; when the
  azure plugin is not installed (`packer init` needs the network) it falls back
  to `-syntax-only`, and then the structural checks below carry the weight.
  The mode used is printed.
- Structural checks by text, whatever the Packer: the agents are purged, the
  three files uploaded (from the checkout the template sits in unless `repo` is
  set), install.sh run, and the last provisioner deprovisions with
  `--deprovision --user` and then runs `--check`, with `skip_clean`; the
  README's section links the file and shows its build command.
- Packer runs with CHECKPOINT_DISABLE=1 (no version check), a dead proxy, a
  private HOME, and, where it can be had, in a network namespace of its own, so
  nothing can leave the machine; skipped with the reason printed when there is
  no packer.
"""

import os
import re
import shutil
import sys
import tempfile
import unittest

from tests.support import DEAD_PROXY_ENV, REPO, run_command, skip

TEMPLATE = os.path.join(REPO, 'packer', 'azure-provisioning.pkr.hcl')
README = os.path.join(REPO, 'README.md')
HEADING = '## Building the image with Packer'
UPLOADED = ('azure_provisioning.py', 'azure-provisioning.service', 'install.sh')
# values for the example's variables that have no default
VARIABLES = {'resource_group': 'images'}
PACKER_TIMEOUT = 120


def template_text(path=None):
    """The text of the Packer template."""
    with open(path or TEMPLATE) as f:
        return f.read()


def readme_section():
    """The README's Packer section, to its next heading of the same level."""
    with open(README) as f:
        text = f.read()
    start = text.find('\n' + HEADING + '\n')
    if start < 0:
        raise AssertionError('README.md has no "%s" section' % HEADING)
    section = text[start + 1:]
    following = section.find('\n## ')
    return section if following < 0 else section[:following]


def without_required_plugins(text):
    """text less its `required_plugins { ... }` block (for a Packer older than 1.7)."""
    pattern = re.compile(r'^( *)required_plugins \{\n.*?^\1\}\n', re.M | re.S)
    found = pattern.findall(text)
    if len(found) != 1:
        raise AssertionError('expected one required_plugins block, found %d' % len(found))
    return pattern.sub('', text)


def provisioners(text):
    """[(type, body)] of the provisioner blocks, in order (body: to the next one)."""
    parts = re.split(r'^ *provisioner "([^"]+)" \{', text, flags=re.M)
    return list(zip(parts[1::2], parts[2::2]))


def packer_version(packer):
    run = run_command([packer, 'version'], env=packer_env(tempfile.gettempdir()), timeout=30)
    match = re.search(r'Packer v(\d+)\.(\d+)\.(\d+)', run.stdout)
    if run.code != 0 or not match:
        raise AssertionError('cannot tell the version of %s: %r' % (packer, run))
    return tuple(int(n) for n in match.groups())


def packer_env(home):
    env = dict(os.environ, HOME=home, CHECKPOINT_DISABLE='1',
               PACKER_CACHE_DIR=os.path.join(home, 'cache'), **DEAD_PROXY_ENV)
    for name in ('PACKER_CONFIG', 'PACKER_CONFIG_DIR', 'PACKER_PLUGIN_PATH', 'PACKER_LOG'):
        env.pop(name, None)
    return env


def offline_prefix():
    """A command prefix giving packer a network namespace of its own (only a
    loopback), or [] where none can be had (then CHECKPOINT_DISABLE and the dead
    proxy still keep it from calling out)."""
    unshare = shutil.which('unshare')
    if not unshare:
        return []
    for prefix in ([unshare, '--net'], [unshare, '--user', '--map-root-user', '--net']):
        try:
            if run_command(prefix + ['true'], timeout=10).code == 0:
                return prefix
        except (OSError, AssertionError):
            pass
    return []


class PackerExample(unittest.TestCase):
    template = None     # None: the repository's packer/azure-provisioning.pkr.hcl

    def setUp(self):
        self.hcl = template_text(self.template)

    def test_the_readme_links_the_template(self):
        section = readme_section()
        self.assertIn('(packer/azure-provisioning.pkr.hcl)', section)
        self.assertNotIn('```hcl', section, 'the template lives in its file, not copied here')
        # the command the README and the file's header show, with the file's real path
        self.assertIn('packer build -var resource_group=images '
                      'packer/azure-provisioning.pkr.hcl', section)
        self.assertIn('packer build -var resource_group=images '
                      'packer/azure-provisioning.pkr.hcl', self.hcl)

    def test_the_example_has_the_steps(self):
        hcl = self.hcl
        self.assertRegex(hcl, r'required_plugins \{\s*azure = \{[^}]*source\s*=\s*'
                              r'"github.com/hashicorp/azure"')
        self.assertRegex(hcl, r'source "azure-arm" "[^"]+" \{')
        for key in ('os_type', 'image_publisher', 'image_offer', 'image_sku', 'vm_size',
                    'location', 'managed_image_name', 'managed_image_resource_group_name'):
            self.assertRegex(hcl, r'\n *%s\s*=' % key)
        self.assertRegex(hcl, r'os_type\s*=\s*"Linux"')
        self.assertIn('use_azure_cli_auth', hcl)
        # without -var repo, the files come from the checkout the template sits in
        self.assertRegex(hcl, r'var\.repo != "" \? var\.repo : "\$\{path\.root\}/\.\."')

        steps = provisioners(hcl)
        kinds = [kind for kind, _ in steps]
        self.assertEqual(kinds.count('file'), 1, kinds)
        self.assertEqual(kinds[-1], 'shell', kinds)
        where = {}
        for index, (kind, body) in enumerate(steps):
            if re.search(r'apt-get purge -y [^"\n]*\b(waagent|walinuxagent)\b', body):
                self.assertRegex(body, r'apt-get purge -y [^"\n]*\bcloud-init\b')
                self.assertIn('/var/lib/waagent', body)
                self.assertIn('/var/lib/cloud', body)
                where['purge'] = index
            if kind == 'file':
                for name in UPLOADED:
                    self.assertIn('/%s"' % name, body)
                where['upload'] = index
            if re.search(r'\bsh /tmp/install\.sh\b', body):
                where['install'] = index
        self.assertEqual(sorted(where), ['install', 'purge', 'upload'], where)
        self.assertLess(where['purge'], where['install'])
        self.assertLess(where['upload'], where['install'])
        self.assertLess(where['install'], len(steps) - 1)

        # the last provisioner: deprovision, then the check; nothing runs after it
        last = steps[-1][1]
        deprovision = last.find('azure-provisioning --deprovision --user')
        check = last.find('azure-provisioning --check')
        self.assertGreaterEqual(deprovision, 0, last)
        self.assertGreater(check, deprovision, '--check must come after --deprovision')
        self.assertRegex(last, r'skip_clean\s*=\s*true')
        for kind, body in steps:
            if kind == 'shell':
                self.assertRegex(body, r'\n *execute_command\s*=')
        # sh -e: a failing --check fails the build (`sh FILE` ignores the shebang's -e)
        self.assertRegex(hcl, r"sudo -E sh -e\w* '\{\{ \.Path \}\}'")

    def test_packer_validate(self):
        packer = shutil.which('packer')
        if not packer:
            skip(self, 'packer is not installed (apt-get install packer; .ci/run does)')
        version = packer_version(packer)
        work = tempfile.mkdtemp(prefix='azp-packer-')
        self.addCleanup(shutil.rmtree, work, True)
        text = self.hcl
        if version < (1, 7):
            text = without_required_plugins(text)
            mode = ('full validate, required_plugins removed (Packer %d.%d.%d predates it '
                    'and builds azure-arm in)' % version)
        else:
            mode = 'full validate'
        template = os.path.join(work, 'image.pkr.hcl')
        with open(template, 'w') as f:
            f.write(text)
        prefix = offline_prefix()
        arguments = ['-var', 'repo=' + REPO]
        for name, value in sorted(VARIABLES.items()):
            arguments += ['-var', '%s=%s' % (name, value)]
        env = packer_env(work)
        old_cwd = os.getcwd()
        os.chdir(work)      # packer may leave a packer_cache/ in its working directory
        try:
            run = run_command(prefix + [packer, 'validate'] + arguments + [template],
                              env=env, timeout=PACKER_TIMEOUT)
            if (run.code != 0 and version >= (1, 7)
                    and re.search(r'packer init|[Mm]issing plugin|[Uu]nknown (source|builder)',
                                  run.stdout + run.stderr)):
                mode = 'syntax-only (the azure plugin is not installed: packer init is online)'
                run = run_command(prefix + [packer, 'validate', '-syntax-only'] + arguments
                                  + [template], env=env, timeout=PACKER_TIMEOUT)
        finally:
            os.chdir(old_cwd)
        sys.stderr.write('\npacker %d.%d.%d: %s, %s: exit %d\n'
                         % (version + (mode, 'in a network namespace of its own' if prefix
                                       else 'no network namespace to be had', run.code)))
        self.assertEqual(run.code, 0, 'packer validate failed on %s:\n%r'
                         % (self.template or TEMPLATE, run))


if __name__ == '__main__':
    unittest.main()
