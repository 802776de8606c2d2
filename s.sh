step() { echo "## $*"; "$@" 2>&1 | sed "s|$PWD|\$DIR|g"; echo "rc ${PIPESTATUS[0]}"; }
step stat -c '%s %A %h %F' mnt grow
step dd if=data of=mnt bs=64k seek=16 conv=notrunc,fsync status=none
step cmp -n 4194304 data mnt -i 0:1048576
step dd if=data of=mnt bs=1M seek=63 count=2 conv=notrunc status=none
step stat -c %s mnt
step chmod 640 mnt
step stat -c %A mnt
step touch mnt
step fallocate -p -o 1M -l 128k mnt
step cmp -n 131072 mnt /dev/zero -i 1048576:0
step fallocate -z -o 2M -l 64k mnt
step python3 -c '
import os
fd = os.open("mnt", os.O_RDONLY)
for off in (0, 1 << 20, (1 << 20) + (128 << 10), 5 << 20, 63 << 20):
    for w, n in ((os.SEEK_DATA, "data"), (os.SEEK_HOLE, "hole")):
        try: print(n, off, os.lseek(fd, off, w))
        except OSError as e: print(n, off, e.strerror)
'
step dd if=data of=grow bs=64k seek=20 count=2 conv=notrunc status=none
step stat -c %s grow
step truncate -s 32M mnt
step stat -c %s mnt
