"""Transport section: addresses, the retry policy, size and time limits."""

import socket
import threading
import time
import unittest

import azure_provisioning as ap


class QuietLog(ap.Log):
    """Keeps the lines it would print."""

    def __init__(self):
        ap.Log.__init__(self, verbose=True)
        self.lines = []

    def write(self, message):
        self.lines.append(message)


class RawServer(object):
    """Answers every connection on 127.0.0.1 with `reply` (bytes) after `delay` s."""

    def __init__(self, reply, delay=0.0, hold=0.0):
        self.reply, self.delay, self.hold = reply, delay, hold
        self.sock = socket.socket()
        self.sock.bind(('127.0.0.1', 0))
        self.sock.listen(8)
        self.sock.settimeout(10)
        self.address = self.sock.getsockname()
        self.connections = 0
        self.recv_hook = lambda data: None
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            try:
                self.recv_hook(conn.recv(65536))
                time.sleep(self.delay)
                parts = self.reply if isinstance(self.reply, list) else [self.reply]
                for i, part in enumerate(parts):
                    time.sleep(0.2 if i else 0)     # arrives in separate reads
                    conn.sendall(part)
                time.sleep(self.hold)               # the connection stays open
            except OSError:
                pass
            finally:
                conn.close()

    def close(self):
        self.sock.close()


class Logging(unittest.TestCase):
    def lines(self, verbose, quieter):
        import io
        stream = io.StringIO()
        log = ap.Log(verbose, stream)
        log = log.quieter() if quieter else log
        log.info('i')
        log.debug('d')
        log.warning('w')
        log.error('e')
        return stream.getvalue().splitlines()

    def test_levels(self):
        p = 'azure-provisioning: '
        self.assertEqual(self.lines(False, False), [p + 'i', p + 'warning: w', p + 'error: e'])
        self.assertEqual(self.lines(True, False), [p + 'i', p + 'd', p + 'warning: w',
                                                   p + 'error: e'])
        self.assertEqual(self.lines(False, True), [p + 'warning: w', p + 'error: e'])
        self.assertEqual(self.lines(True, True), self.lines(True, False))


class LogLines(unittest.TestCase):
    def test_one_line_each_without_raw_controls(self):
        # an IMDS value or a hook line must not forge a line of ours or drive the terminal
        import io
        stream = io.StringIO()
        ap.Log(stream=stream).info('vm abc\nazure-provisioning: Ready accepted\r\x1b[2J'
                                   '\x9b2J\x00\tend')
        self.assertEqual(stream.getvalue(), 'azure-provisioning: vm abc\ufffdazure-provisioning: '
                         'Ready accepted\ufffd\ufffd2J\ufffd\tend\n')


class Addresses(unittest.TestCase):
    def test_forms(self):
        self.assertEqual(ap.parse_address('168.63.129.16'), ('168.63.129.16', 80))
        self.assertEqual(ap.parse_address('127.0.0.1:8080'), ('127.0.0.1', 8080))
        self.assertEqual(ap.parse_address('[::1]:81'), ('::1', 81))
        self.assertEqual(ap.parse_address(' [fe80::1] '), ('fe80::1', 80))
        self.assertEqual(ap.parse_address('[::ffff:1.2.3.4]:8'), ('::ffff:1.2.3.4', 8))
        for bad in ['', '1.2.3.4:', '1.2.3.4:0', '1.2.3.4:70000', 'a:b:c', '1.2.3.4:80x',
                    ':80', '[::1', '[::1]x', '[::1]:', '[zz]:80', '[]:80', '1.2.3.4:123456',
                    'a]:80', '1.2.3.4:\u0662',
                    # not IP addresses: each would become a DNS lookup retried to the deadline
                    '169.254.169.2544', '1.2.3', 'metadata', '1.2.3.4.5', '01.2.3.4x',
                    '[1.2.3.4]:80', 'metadata:80', '256.1.1.1', '[::1%lo]:80', '[:::]:80']:
            with self.subTest(address=bad):
                with self.assertRaises(ValueError):
                    ap.parse_address(bad)

    def test_usage_error_at_once_for_a_name(self):
        import subprocess
        import sys
        started = time.monotonic()
        for flag in ('--imds', '--wireserver'):
            for bad in ('169.254.169.2544', 'metadata', '1.2.3'):
                with self.subTest(flag=flag, address=bad):
                    done = subprocess.run([sys.executable, ap.__file__, flag, bad, '--timeout', '30'],
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          universal_newlines=True, timeout=20)
                    self.assertEqual(done.returncode, 2, done.stderr)
                    errors = [l for l in done.stderr.splitlines() if 'error:' in l]
                    self.assertEqual(len(errors), 1, done.stderr)
                    self.assertIn(bad, errors[0])
                    self.assertNotIn('Traceback', done.stderr)
        self.assertLess(time.monotonic() - started, 15)


class RetryPolicy(unittest.TestCase):
    def test_backoff_grows_then_caps_with_jitter(self):
        for attempt in range(1, 30):
            delay = ap.backoff_delay(attempt)
            ceiling = min(ap.BACKOFF_CAP, ap.BACKOFF_FIRST * 2 ** (attempt - 1))
            self.assertTrue(ceiling / 2 <= delay <= ceiling, (attempt, delay))

    def test_retry_after_lengthens_never_shortens_and_is_cut_at_the_deadline(self):
        # the one Retry-After rule, as with_retries applies it
        self.assertEqual(ap.backoff_delay(3, retry_after=2.0, remaining=10.0), 2.0)
        # Retry-After never shortens the backoff: "0" must not mean "at once"
        for attempt in range(1, 30):
            self.assertGreaterEqual(ap.backoff_delay(attempt, retry_after=0, remaining=10.0),
                                    min(ap.BACKOFF_CAP, ap.BACKOFF_FIRST * 2 ** (attempt - 1)) / 2)
        # past the deadline: cut so that one more attempt (one backoff) still fits
        for _ in range(20):
            delay = ap.backoff_delay(1, retry_after=3600, remaining=2.0)
            self.assertTrue(2.0 - ap.BACKOFF_FIRST <= delay <= 2.0 - ap.BACKOFF_FIRST / 2, delay)
        # no time for even the backoff: no retry at all, whatever the server said
        self.assertIsNone(ap.backoff_delay(30, retry_after=1.0, remaining=ap.BACKOFF_CAP / 2 - 0.01))
        self.assertIsNone(ap.backoff_delay(1, remaining=0.0))

    def test_retries_until_success(self):
        answers = [ap.TryAgain('one'), ap.TryAgain('two'), 'done']

        def attempt():
            answer = answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return answer
        log = QuietLog()
        self.assertEqual(ap.with_retries('thing', attempt, ap.Deadline(10), log), 'done')
        self.assertEqual(len([l for l in log.lines if 'retrying' in l]), 2)

    def test_gives_up_at_the_deadline_with_a_clear_message(self):
        calls = []

        def attempt():
            calls.append(1)
            raise ap.TryAgain('Connection refused')
        started = time.monotonic()
        with self.assertRaisesRegex(ap.ProvisioningError,
                                    r'^thing: Connection refused; gave up after \d+ attempts'):
            ap.with_retries('thing', attempt, ap.Deadline(1.0), QuietLog())
        took = time.monotonic() - started
        self.assertLess(took, 1.0)
        self.assertGreater(took, 0.6)
        self.assertGreater(len(calls), 3)

    def test_retry_after_zero_does_not_flood(self):
        calls = []

        def attempt():
            calls.append(1)
            raise ap.TryAgain('HTTP 503', retry_after=0)
        with self.assertRaises(ap.ProvisioningError):
            ap.with_retries('thing', attempt, ap.Deadline(1.0), QuietLog())
        # the backoff alone allows about 8 in a second; Retry-After: 0 used to allow thousands
        self.assertLess(len(calls), 20)

    def test_retry_after_beyond_the_deadline_is_cut_to_the_time_left(self):
        calls = []

        def attempt():
            calls.append(time.monotonic())
            if len(calls) == 1:
                raise ap.TryAgain('HTTP 503', retry_after=3600)
            return 'up'
        started = time.monotonic()
        self.assertEqual(ap.with_retries('thing', attempt, ap.Deadline(2.0), QuietLog()), 'up')
        self.assertEqual(len(calls), 2)
        self.assertLess(time.monotonic() - started, 2.0)

    def test_other_errors_are_not_retried(self):
        calls = []

        def attempt():
            calls.append(1)
            raise ap.ProvisioningError('final')
        with self.assertRaisesRegex(ap.ProvisioningError, 'final'):
            ap.with_retries('thing', attempt, ap.Deadline(5), QuietLog())
        self.assertEqual(len(calls), 1)

    def test_repeated_problem_is_logged_once_not_per_attempt(self):
        def attempt():
            raise ap.TryAgain('Connection refused')
        log = QuietLog()
        log.verbose = False
        with self.assertRaises(ap.ProvisioningError):
            ap.with_retries('thing', attempt, ap.Deadline(1.0), log)
        self.assertEqual(len(log.lines), 1, log.lines)

    def test_flapping_problems_are_each_logged_once(self):
        problems = ['Connection reset by peer', 'Remote end closed'] * 10

        def attempt():
            if problems:
                raise ap.TryAgain(problems.pop())
            return 'up'
        log = QuietLog()
        log.verbose = False
        self.assertEqual(ap.with_retries('thing', attempt, ap.Deadline(30), log), 'up')
        self.assertEqual(len(log.lines), 2, log.lines)

    def test_reserve_is_kept_back(self):
        deadline = ap.Deadline(10, reserve=4)
        self.assertTrue(5.5 < deadline.remaining() <= 6)
        self.assertTrue(9.5 < deadline.without_reserve().remaining() <= 10)


class Exchange(unittest.TestCase):
    def exchange(self, reply, delay=0.0, deadline=5.0, hold=0.0, **kwargs):
        server = RawServer(reply, delay, hold)
        self.addCleanup(server.close)
        return ap.http_exchange(server.address, 'GET', '/x', {}, ap.Deadline(deadline),
                                QuietLog(), **kwargs)

    def test_ok(self):
        response = self.exchange(b'HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi')
        self.assertEqual((response.status, response.body), (200, b'hi'))

    def test_chunked_and_connection_delimited_bodies(self):
        chunked = self.exchange(b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n'
                                b'5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\n\r\n')
        self.assertEqual(chunked.body, b'hello, world')
        until_close = self.exchange(b'HTTP/1.0 200 OK\r\nServer: x\r\n\r\nall of it')
        self.assertEqual((until_close.body, until_close.headers['server']), (b'all of it', 'x'))

    def test_request_is_plain_http_1_1_with_close(self):
        server = RawServer(b'HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n')
        self.addCleanup(server.close)
        seen = []
        server.recv_hook = seen.append
        ap.http_exchange(server.address, 'POST', '/machine?comp=health', {'x-ms-version': '1'},
                         ap.Deadline(5), QuietLog(), body=b'<Health/>')
        request = seen[0]
        host = ('Host: 127.0.0.1:%d' % server.address[1]).encode()
        self.assertTrue(request.startswith(b'POST /machine?comp=health HTTP/1.1\r\n' + host
                                           + b'\r\nConnection: close\r\n'), request)
        self.assertIn(b'\r\nx-ms-version: 1\r\n', request)
        self.assertTrue(request.endswith(b'Content-Length: 9\r\n\r\n<Health/>'), request)

    def test_host_header_carries_the_port_unless_80_and_brackets_ipv6(self):
        self.assertEqual(ap.host_header(('168.63.129.16', 80)), '168.63.129.16')
        self.assertEqual(ap.host_header(('127.0.0.1', 8080)), '127.0.0.1:8080')
        self.assertEqual(ap.host_header(('::1', 80)), '[::1]')
        self.assertEqual(ap.host_header(('fe80::1', 81)), '[fe80::1]:81')

    def test_interim_1xx_answers_are_skipped(self):
        for interim in [b'HTTP/1.1 100 Continue\r\n\r\n',
                        b'HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\n\r\n',
                        b'HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n']:
            with self.subTest(interim=interim):
                response = self.exchange([interim, b'HTTP/1.1 201 Created\r\n'
                                          b'Content-Length: 2\r\n\r\nok'])
                self.assertEqual((response.status, response.body), (201, b'ok'))
                response = self.exchange(interim + b'HTTP/1.1 200 OK\r\n'
                                         b'Content-Length: 2\r\n\r\nhi')
                self.assertEqual((response.status, response.body), (200, b'hi'))

    def test_chunk_framing_is_parsed_not_guessed(self):
        head = b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n'
        # the first chunk's data looks like the last-chunk marker, at the end of a read
        response = self.exchange([head + b'9\r\nab\r\n0\r\n\r\n\r\n',
                                  b'5\r\nhello\r\n0\r\n\r\n'])
        self.assertEqual(response.body, b'ab\r\n0\r\n\r\nhello')
        # trailers, extensions, sizes in upper case, split anywhere; the server keeps
        # the connection open after the last chunk: the answer ends at the framing
        started = time.monotonic()
        response = self.exchange([head + b'A;name="x"\r\n0123', b'456789\r',
                                  b'\n0\r\nX-Trailer: y\r\n', b'\r\n'], hold=5)
        self.assertEqual(response.body, b'0123456789')
        self.assertLess(time.monotonic() - started, 3)
        for broken in [b'5\r\nhelloXX0\r\n\r\n',          # no CRLF after the data
                       b'5\r\nhello\r\n0\r\nX-Trailer\r\n\r\n',   # bad trailer
                       b'-5\r\nhello\r\n0\r\n\r\n', b'\r\n', b'0x5\r\nhello\r\n0\r\n\r\n',
                       b'5\r\nhel']:
            with self.subTest(broken=broken):
                with self.assertRaises(ap.TryAgain):
                    self.exchange(head + broken)

    def test_no_body_for_204_and_304(self):
        for status in (204, 304):
            with self.subTest(status=status):
                started = time.monotonic()
                response = self.exchange(('HTTP/1.1 %d X\r\n\r\n' % status).encode(), hold=5)
                self.assertEqual((response.status, response.body), (status, b''))
                self.assertLess(time.monotonic() - started, 3)

    def test_answers_that_cannot_get_better_are_malformed(self):
        for reply in [b'SSH-2.0-OpenSSH\r\n\r\n', b'HTTP/1.1 200 OK\r\nno colon here\r\n\r\n',
                      b'HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\nab']:
            with self.subTest(reply=reply):
                with self.assertRaises(ap.Malformed):
                    self.exchange(reply)
        # and with_retries stops after MALFORMED_ANSWERS_ALLOWED of them, not at the deadline
        server = RawServer(b'SSH-2.0-OpenSSH\r\n\r\n')
        self.addCleanup(server.close)
        started = time.monotonic()
        with self.assertRaisesRegex(ap.ProvisioningError, r'\(3 times\)'):
            ap.with_retries('thing', lambda: ap.http_exchange(
                server.address, 'GET', '/', {}, ap.Deadline(30), QuietLog()),
                ap.Deadline(30), QuietLog())
        self.assertLess(time.monotonic() - started, 5)

    def test_status_line_forms(self):
        for line, status, reason in [(b'HTTP/1.1 200 OK', 200, 'OK'), (b'HTTP/1.0 204', 204, ''),
                                     (b'HTTP/1.1 410 Gone Away', 410, 'Gone Away')]:
            with self.subTest(line=line):
                response = self.exchange(line + b'\r\nContent-Length: 0\r\n\r\n')
                self.assertEqual((response.status, response.reason), (status, reason))
        for line in [b'HTTP/2 200 OK', b'HTTP/1.1 20 OK', b'HTTP/1.1 2x0 OK', b'http/1.1 200 OK',
                     b'HTTP/1.1  200 OK', b'ICY 200 OK']:
            with self.subTest(line=line):
                with self.assertRaisesRegex(ap.TryAgain, 'not an HTTP answer'):
                    self.exchange(line + b'\r\nContent-Length: 0\r\n\r\n')

    def test_4xx_is_returned_not_retried(self):
        self.assertEqual(self.exchange(b'HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n')
                         .status, 403)

    def test_5xx_429_and_chosen_statuses_are_retried(self):
        for status, kwargs in [(500, {}), (503, {}), (429, {}), (404, {'retry_statuses': (404,)})]:
            with self.subTest(status=status):
                with self.assertRaises(ap.TryAgain):
                    self.exchange(('HTTP/1.1 %d X\r\nContent-Length: 0\r\n\r\n' % status)
                                  .encode(), **kwargs)

    def test_only_ascii_digits_are_numbers(self):
        # str.isdigit() is true for '²': float('²') then raised ValueError, and the run
        # failed at once instead of retrying
        self.assertIsNone(ap.retry_after_seconds('\xb2'))
        self.assertIsNone(ap.retry_after_seconds('\u0663'))
        self.assertEqual(ap.retry_after_seconds(' 7 '), 7.0)
        with self.assertRaises(ap.TryAgain):
            self.exchange(b'HTTP/1.1 503 Busy\r\nRetry-After: \xb2\r\nContent-Length: 0\r\n\r\n')
        with self.assertRaisesRegex(ap.Malformed, 'Content-Length'):
            self.exchange(b'HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\nab')

    def test_retry_after_is_read(self):
        with self.assertRaises(ap.TryAgain) as caught:
            self.exchange(b'HTTP/1.1 429 Too Many\r\nRetry-After: 3\r\nContent-Length: 0\r\n\r\n')
        self.assertEqual(caught.exception.retry_after, 3.0)

    def test_oversized_response_is_refused(self):
        body = b'x' * (ap.MAX_RESPONSE_BYTES + 10)
        for head in [b'Content-Length: %d\r\n' % len(body), b'Transfer-Encoding: chunked\r\n',
                     b'']:
            with self.subTest(head=head):
                data = body if b'chunked' not in head else b'%x\r\n%s\r\n0\r\n\r\n' % (
                    len(body), body)
                with self.assertRaisesRegex(ap.Malformed, 'larger than'):
                    self.exchange(b'HTTP/1.1 200 OK\r\n' + head + b'\r\n' + data)

    def test_garbage_and_hangups_are_retried(self):
        for reply in [b'', b'SSH-2.0-OpenSSH\r\n\r\n', b'HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab',
                      b'HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\nab',
                      b'HTTP/1.1 200 OK\r\nno colon here\r\n\r\n',
                      b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n',
                      b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab']:
            with self.subTest(reply=reply):
                with self.assertRaises(ap.TryAgain):
                    self.exchange(reply)

    def test_an_answer_cut_short_may_get_better_so_it_is_not_malformed(self):
        # the exception's type decides: Malformed would stop after 3, TryAgain waits
        for reply in [b'', b'HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab',
                      b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab']:
            with self.subTest(reply=reply):
                with self.assertRaises(ap.TryAgain) as caught:
                    self.exchange(reply)
                self.assertNotIsInstance(caught.exception, ap.Malformed)
                self.assertIn('connection closed', str(caught.exception))

    def test_a_silent_server_times_out_within_the_deadline(self):
        started = time.monotonic()
        with self.assertRaisesRegex(ap.TryAgain, 'timed out'):
            self.exchange(b'', delay=5, deadline=0.5)
        self.assertLess(time.monotonic() - started, 2.0)

    def test_refused_connection_is_retried(self):
        sock = socket.socket()
        sock.bind(('127.0.0.1', 0))      # bound, not listening: connections are refused
        self.addCleanup(sock.close)
        with self.assertRaisesRegex(ap.TryAgain, 'refused'):
            ap.http_exchange(sock.getsockname(), 'GET', '/', {}, ap.Deadline(5), QuietLog())


class EverythingWaitsOnTheDeadline(unittest.TestCase):
    """No command the script runs may outlive the shared deadline."""

    def setUp(self):
        import os
        import shutil
        import tempfile
        self.tmp = tempfile.mkdtemp(prefix='azp-bounded-')
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.bin = os.path.join(self.tmp, 'bin')
        os.mkdir(self.bin)
        old_path = os.environ['PATH']
        self.addCleanup(os.environ.__setitem__, 'PATH', old_path)
        os.environ['PATH'] = self.bin + os.pathsep + old_path

    def stand_in(self, name, script='sleep 600'):
        import os
        path = os.path.join(self.bin, name)
        with open(path, 'w') as f:
            f.write('#!/bin/sh\n%s\n' % script)
        os.chmod(path, 0o755)
        return path

    def assert_bounded(self, call, seconds=1.0):
        started = time.monotonic()
        with self.assertRaisesRegex(ap.ProvisioningError, 'timed out|no time left'):
            call(ap.Deadline(seconds))
        self.assertLess(time.monotonic() - started, seconds + 1.0)

    def test_run_tool_never_outlives_the_deadline(self):
        self.assert_bounded(lambda d: ap.run_tool(['sleep', '5'], d, 'x'), 0.3)
        self.assert_bounded(lambda d: ap.run_tool(['true'], d, 'x'), 0.0)

    def test_a_check_like_visudo(self):
        import os
        self.assert_bounded(lambda d: ap.write_file_atomically(
            os.path.join(self.tmp, 'rule'), b'x', check=['sh', '-c', 'sleep 600', 'sh'],
            deadline=d))
        self.assertEqual(sorted(os.listdir(self.tmp)), ['bin'])

    def test_restorecon(self):
        import os
        self.stand_in('restorecon')
        old_fs = ap.SELINUX_FS
        self.addCleanup(setattr, ap, 'SELINUX_FS', old_fs)
        ap.SELINUX_FS = self.tmp       # "SELinux is enabled"
        home = os.path.join(self.tmp, 'home')
        os.mkdir(home)
        import pwd
        me = pwd.getpwuid(os.getuid()).pw_name
        key = b'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBn0rqjmEIvRQGfFGxDBRjRAFBkUcUwLDwn0W3bnuzJ0 a\n'

        # the account as the root's own /etc/passwd has it: its home is the root's /
        os.mkdir(os.path.join(home, 'etc'))
        with open(os.path.join(home, 'etc', 'passwd'), 'w') as f:
            f.write('%s:x:%d:%d::/:/bin/sh\n' % (me, os.getuid(), os.getgid()))

        def install(deadline):
            ap.install_keys(ap.System(home, deadline, QuietLog()), me, '/.ssh/authorized_keys',
                            [key.decode().strip()])
        self.assert_bounded(install)

    def test_sshd_reload(self):
        self.stand_in('systemctl')
        old = ap.system_systemd
        self.addCleanup(setattr, ap, 'system_systemd', old)
        ap.system_systemd = lambda: True
        log = QuietLog()
        system = ap.System('/', ap.Deadline(1.0), log)
        started = time.monotonic()
        ap.restart_sshd(system, required=False)     # a warning, within the deadline
        self.assertLess(time.monotonic() - started, 2.0)
        self.assertRegex(log.lines[-1], r'^warning: sshd not reloaded.*timed out')

    def test_hook_output_without_newlines_is_read_in_bounded_lines(self):
        # 40 MB on stderr with no newline: read whole, it cost 40 MB and more of memory
        import os
        import subprocess
        import sys
        hook = self.stand_in('hook', "head -c 40000000 /dev/zero | tr '\\0' x >&2; exit 3")
        code = ('import sys; sys.path.insert(0, %r); import azure_provisioning as ap\n'
                'try:\n    ap.run_hook(%r, {}, ap.Deadline(60), ap.Log(stream=open("/dev/null", "w")))\n'
                'except ap.ProvisioningError as exc:\n    print(str(exc)[:60])\n'
                # VmHWM, not ru_maxrss: that one keeps the peak of the process before exec
                'print([l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM")][0])'
                % (os.path.dirname(ap.__file__), hook))
        out = subprocess.run([sys.executable, '-c', code], stdout=subprocess.PIPE,
                             universal_newlines=True, timeout=60).stdout.splitlines()
        self.assertTrue(out[0].startswith('hook hook failed with exit status 3: xxx'), out)
        self.assertLess(int(out[1]), 35000, 'peak RSS %s kB' % out[1])

    def test_a_killed_hook_that_does_not_go_away(self):
        # SIGKILL cannot end a process in uninterruptible sleep: stand in for that with a
        # kill that does nothing; the run goes on after HOOK_KILL_GRACE
        import os
        pid_file = os.path.join(self.tmp, 'hook.pid')
        hook = self.stand_in('hook', 'echo $$ > %s; echo "stuck" >&2; exec sleep 30' % pid_file)
        old_kill, old_grace = os.killpg, ap.HOOK_KILL_GRACE
        self.addCleanup(setattr, os, 'killpg', old_kill)
        self.addCleanup(setattr, ap, 'HOOK_KILL_GRACE', old_grace)
        os.killpg = lambda pid, signal: None
        ap.HOOK_KILL_GRACE = 0.5
        started = time.monotonic()
        try:
            with self.assertRaisesRegex(ap.ProvisioningError, r'^hook hook timed out after'):
                ap.run_hook(hook, dict(os.environ), ap.Deadline(1.0), QuietLog())
            self.assertLess(time.monotonic() - started, 3.0)
        finally:
            os.killpg = old_kill
            with open(pid_file) as f:
                os.kill(int(f.read()), 9)


if __name__ == '__main__':
    unittest.main()
