import os
from tests.test_remote import remote
def test_dbg(shell, ns, module_runner, monkeypatch):
    monkeypatch.chdir("/tmp/files_scratch/proj/nb")
    r, cap = remote(shell, module_runner.url, """
import os, glob
from pathlib import Path
print(os.getcwd())
print(open('data.csv').read())
print(open('../data/train.csv').read())
print(sorted(os.listdir('..')), glob.glob('../data/*.csv'), sorted(p.name for p in Path('.').iterdir()))
import sys; sys.path.insert(0, str(Path.cwd().parent / 'src'))
import pkg; print(pkg.f())
open('out.txt', 'w').write('written remotely')
for bad in ['pw', '../secret/k', 'x.log', '../.git/config', '/etc/hostname', 'missing.csv']:
    try:
        open(bad).read(); print('READ', bad)
    except Exception as e:
        print(bad, type(e).__name__, e)
""")
    print(cap.stdout, cap.stderr)
    print(open("/tmp/files_scratch/proj/nb/out.txt").read())
