import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.Statement;
import org.postgresql.PGConnection;
import org.postgresql.PGNotification;

/**
 * LISTEN/NOTIFY through pgproxy with pgjdbc: autocommit off (a Query "BEGIN" ahead of each
 * extended-protocol batch) and server-side prepared statements from the first execution.
 * Prints "channel:payload:own" for each notification the listener receives.
 */
public class ListenJdbc {
    public static void main(String[] args) throws Exception {
        String url = args[0];
        try (Connection listener = DriverManager.getConnection(url);
                Connection sender = DriverManager.getConnection(url)) {
            listener.setAutoCommit(false);
            try (Statement st = listener.createStatement()) {
                st.execute("LISTEN jdbc_chan");
            }
            listener.commit();
            PGConnection pg = listener.unwrap(PGConnection.class);
            try (PreparedStatement ps = sender.prepareStatement("SELECT pg_notify('jdbc_chan', ?)")) {
                for (int i = 0; i < 3; i++) {
                    ps.setString(1, "n" + i);
                    ps.execute();
                }
            }
            try (Statement st = listener.createStatement()) {
                st.execute("NOTIFY jdbc_chan, 'self'");
            }
            listener.commit();
            StringBuilder out = new StringBuilder();
            int got = 0;
            long deadline = System.currentTimeMillis() + 10000;
            while (got < 4 && System.currentTimeMillis() < deadline) {
                PGNotification[] ns = pg.getNotifications(500);
                if (ns == null) {
                    continue;
                }
                for (PGNotification n : ns) {
                    boolean own = n.getPID() == pg.getBackendPID();
                    out.append(n.getName()).append(':').append(n.getParameter()).append(':')
                            .append(own).append(' ');
                    got++;
                }
            }
            System.out.println(out.toString().trim());
        }
    }
}
