"""tests/untouched.py, the check that .ci/run left /var/lib and /etc as it found them,
sees a file added, changed (content, mode, time) or removed, a link retargeted, and
nothing where nothing happened; exclusions are honoured and printed."""

import contextlib
import io
import json
import os
import shutil
import tempfile
import unittest

from tests import untouched


class Untouched(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix='azp-untouched-')
        self.addCleanup(shutil.rmtree, self.tmp)
        self.tree = os.path.join(self.tmp, 'tree')
        os.makedirs(os.path.join(self.tree, 'sub', 'deeper'))
        os.makedirs(os.path.join(self.tree, 'churn'))
        for name, data in (('a', b'alpha\n'), ('sub/b', b'beta\n'), ('sub/deeper/c', b'c'),
                           ('churn/stamp', b'1')):
            self.write(name, data)
        os.symlink('a', os.path.join(self.tree, 'link'))
        self.file = os.path.join(self.tmp, 'snapshot.json')

    def write(self, name, data):
        with open(os.path.join(self.tree, name), 'wb') as f:
            f.write(data)

    def run_main(self, *argv):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = untouched.main(list(argv))
        return code, out.getvalue()

    def take(self, *extra):
        code, out = self.run_main('snapshot', self.file, self.tree, *extra)
        self.assertEqual(code, 0, out)
        return out

    def compare(self):
        return self.run_main('compare', self.file)

    def test_nothing_done_is_no_difference(self):
        self.take()
        code, out = self.compare()
        self.assertEqual(code, 0, out)
        self.assertIn('untouched: no difference', out)

    def test_an_added_file_is_seen(self):
        self.take()
        self.write('sub/deeper/new', b'')
        code, out = self.compare()
        self.assertEqual(code, 1, out)
        self.assertIn('added    %s/sub/deeper/new (file)' % self.tree, out)

    def test_a_removed_file_is_seen(self):
        self.take()
        os.unlink(os.path.join(self.tree, 'sub/b'))
        code, out = self.compare()
        self.assertEqual(code, 1, out)
        self.assertIn('removed  %s/sub/b (file)' % self.tree, out)

    def test_changed_content_of_the_same_size_and_time_is_seen(self):
        path = os.path.join(self.tree, 'a')
        st = os.stat(path)
        self.take()
        self.write('a', b'ALPHA\n')
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))     # time put back
        code, out = self.compare()
        self.assertEqual(code, 1, out)
        self.assertRegex(out, r'changed  %s/a: sha256 [0-9a-f]{64} -> [0-9a-f]{64}\n'
                         % self.tree)

    def test_a_mode_and_a_link_target_are_seen(self):
        self.take()
        os.chmod(os.path.join(self.tree, 'sub/b'), 0o600)
        os.unlink(os.path.join(self.tree, 'link'))
        os.symlink('sub/b', os.path.join(self.tree, 'link'))
        code, out = self.compare()
        self.assertEqual(code, 1, out)
        self.assertIn('changed  %s/sub/b: mode 0644 -> 0600' % self.tree, out)
        self.assertRegex(out, r'changed  %s/link: .*target a -> sub/b' % self.tree)

    def test_a_fifo_is_recorded_not_read(self):
        os.mkfifo(os.path.join(self.tree, 'fifo'))
        self.take()
        with open(self.file) as f:
            entries = json.load(f)['entries']
        self.assertEqual(entries[self.tree + '/fifo']['type'], 'fifo')
        self.assertNotIn('sha256', entries[self.tree + '/fifo'])

    def test_an_excluded_tree_is_not_looked_at_and_is_printed(self):
        out = self.take('--exclude', os.path.join(self.tree, 'churn'))
        self.assertIn('not looked at: ', out)
        self.assertIn(os.path.join(self.tree, 'churn'), out)
        self.write('churn/stamp', b'2')
        self.write('churn/new', b'')
        code, out = self.compare()
        self.assertEqual(code, 0, out)
        self.assertIn(os.path.join(self.tree, 'churn'), out)
        self.write('sub/b', b'changed\n')       # outside the exclusion: still seen
        self.assertEqual(self.compare()[0], 1)

    def test_the_snapshot_is_ours_alone(self):
        # it holds hashes of files only root may read
        self.take()
        self.assertEqual(os.stat(self.file).st_mode & 0o777, 0o600)

    def test_the_default_exclusions_are_printed(self):
        out = self.take()
        for path in untouched.DEFAULT_EXCLUDES:
            self.assertIn(path, out)


if __name__ == '__main__':
    unittest.main()
